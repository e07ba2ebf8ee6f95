"""``python -m distnoisy.tune``: see :mod:`distnoisy.tune.cli`."""

import sys

from distnoisy.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())
