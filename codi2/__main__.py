"""`python -m codi2` runs the CLI."""

from codi2.cli import main

raise SystemExit(main())
