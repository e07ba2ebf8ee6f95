import sys

from distnoisy.posttrain.cli import main

sys.exit(main())
