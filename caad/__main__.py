"""``python -m caad`` is the ``caad`` command."""

from .cli import main

raise SystemExit(main())
