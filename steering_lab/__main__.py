"""``python -m steering_lab ...``: the same command line as ``steering-lab``."""

import sys

from .cli import main

sys.exit(main())
