"""``python -m safechroma``."""

import sys

from safechroma._entry import main

sys.exit(main())
