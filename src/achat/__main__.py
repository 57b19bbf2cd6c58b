"""``python -m achat`` runs the client command line."""

from .cli import main

raise SystemExit(main())
