"""``python -m fastfeed``: the same as the ``fastfeed`` command."""

import sys

from .cli import main

sys.exit(main())
