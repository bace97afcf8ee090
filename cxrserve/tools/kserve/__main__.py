"""``python -m cxrserve.tools.kserve``: the same as ``cxrserve kserve``."""
from cxrserve.tools.kserve.cli import main

raise SystemExit(main())
