"""`python -m moec ...`: the `moec` command line (moec.cli), like `python -m pip`."""

import sys

from moec.cli import main

if __name__ == "__main__":
    sys.exit(main())
