"""``python -m cxr_export.domain``: see :mod:`cxr_export.domain.cli`."""
import sys

from .cli import main

sys.exit(main())
