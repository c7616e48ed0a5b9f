"""`python -m polopt ...` is the `polopt` command (polopt/cli.py)."""

import sys

from polopt.cli import main

sys.exit(main())
