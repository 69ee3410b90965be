"""`python -m mlshift_jax` runs the CLI."""

from mlshift_jax.cli import main

raise SystemExit(main())
