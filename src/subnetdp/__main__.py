"""``python -m subnetdp``: the same as the ``subnetdp`` command."""

from subnetdp.cli import main

raise SystemExit(main())
