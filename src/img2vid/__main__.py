"""`python -m img2vid ...`: the same command line as the `img2vid` script."""

import sys

from img2vid.cli import main

if __name__ == "__main__":
    sys.exit(main())
