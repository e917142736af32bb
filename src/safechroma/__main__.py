"""``python -m safechroma``."""

import sys

from safechroma._cli import main

sys.exit(main())
