"""`python -m vaqkd.cli ...`: the command line."""

import sys

from vaqkd.cli import main

sys.exit(main())
