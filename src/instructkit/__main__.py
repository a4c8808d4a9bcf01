"""`python -m instructkit` is the CLI, so `accelerate launch -m instructkit train ...` works."""

from instructkit.cli import main

raise SystemExit(main())
