"""``python -m pdserve`` is the ``pdserve`` command."""

from pdserve.cluster.cli import main

raise SystemExit(main())
