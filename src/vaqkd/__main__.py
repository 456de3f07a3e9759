"""`python -m vaqkd ...`: the command line (also what `torchrun ... -m vaqkd train ...` runs on every rank).

Under torchrun a rank's own error reaches the job's log: an exception is recorded in torchrun's error file
(`record`, which its failure summary prints instead of a bare banner), and a crash below Python (a signal)
prints the Python stack of every thread (`faulthandler`)."""

import faulthandler
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from vaqkd.cli import main

faulthandler.enable()
sys.exit(record(main)())
