"""``python -m subnetdp``: the same as the ``subnetdp`` command."""

try:
    from subnetdp.cli import main
except KeyboardInterrupt:  # Ctrl-C while importing torch: a stop, not a traceback
    raise SystemExit(130) from None

raise SystemExit(main())
