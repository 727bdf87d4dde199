"""``python -m qcd_fx.cli``."""

import sys

from . import main

sys.exit(main())
