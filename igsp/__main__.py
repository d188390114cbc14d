"""`python -m igsp ...`: the same command line as the `igsp` console script."""

import sys

from igsp.cli import main

if __name__ == "__main__":
    sys.exit(main())
