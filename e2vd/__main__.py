"""`python -m e2vd` is the `e2vd` command."""
from e2vd.cli import main

raise SystemExit(main())
