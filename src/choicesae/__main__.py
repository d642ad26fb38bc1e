"""`python -m choicesae`: the command line (cli/main.py)."""

import sys

from choicesae.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
