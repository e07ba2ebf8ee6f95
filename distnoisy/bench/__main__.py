"""``python -m distnoisy.bench``: see :mod:`distnoisy.bench.cli`."""

from distnoisy.bench.cli import main

if __name__ == "__main__":
    main()
