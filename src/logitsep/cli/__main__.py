"""``python -m logitsep.cli ...`` is the ``logitsep`` command too."""

import sys

from . import main

sys.exit(main())
