"""``python -m dynamics COMMAND ...``, the same as ``dynamics COMMAND ...``."""

import sys

from dynamics.cli import main

sys.exit(main())
