"""``python -m cxr_export.domain``: see :mod:`cxr_export.domain.cli`."""
from .cli import main

raise SystemExit(main())
