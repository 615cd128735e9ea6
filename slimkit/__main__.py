"""`python -m slimkit` is `slimkit`."""
from slimkit.cli import main

raise SystemExit(main())
