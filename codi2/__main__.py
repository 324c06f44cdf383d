"""`python -m codi2` runs the CLI."""

from codi2.cli.main import main

raise SystemExit(main())
