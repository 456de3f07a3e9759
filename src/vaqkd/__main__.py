"""`python -m vaqkd ...`: the command line (also what `torchrun ... -m vaqkd train ...` runs on every rank)."""

import sys

from vaqkd.cli import main

sys.exit(main())
