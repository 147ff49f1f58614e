"""``python -m controller`` is the ``statelink`` command."""

import sys

from .cli import main

sys.exit(main())
