"""``python -m logitsep ...`` runs the ``logitsep`` command (also what ``torchrun ... -m logitsep train`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
