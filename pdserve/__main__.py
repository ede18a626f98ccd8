"""``python -m pdserve`` is the ``pdserve`` command."""

from pdserve.cluster.cli.main import main

raise SystemExit(main())
