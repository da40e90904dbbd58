"""``python -m cxr_serve``: the same as ``cxr-serve``."""
import sys

from .cli import main

sys.exit(main())
