"""``python -m cxr_bench`` runs the ``cxr-bench`` command line."""
import sys

from .cli import main

sys.exit(main())
