"""``python -m effdecode``: the command line."""

import sys

from effdecode.cli import main

sys.exit(main())
