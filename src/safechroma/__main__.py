"""``python -m safechroma``."""

import sys

from safechroma.cli import main

sys.exit(main())
