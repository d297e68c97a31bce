"""`python -m launch COMMAND ...`: the emulated-cluster command line (see launch/cli.py)."""

import sys

from launch.cli import main

sys.exit(main())
