"""``python -m distnoisy.analyze``: see :mod:`distnoisy.analyze.cli`."""

import sys

from distnoisy.analyze.cli import main

if __name__ == "__main__":
    sys.exit(main())
