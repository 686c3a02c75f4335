"""``python -m viowire``: the same as the ``viowire`` command."""

from viowire.cli import main

raise SystemExit(main())
