"""`python -m lmforge` runs the command line."""

from .cli import main

raise SystemExit(main())
