"""``python -m deploy.local up|down|status|fetch``."""

import sys

from deploy.local.cli import main

sys.exit(main())
