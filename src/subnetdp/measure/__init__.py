"""Measurement, which reads the core and is never read by it (only the command line, :mod:`subnetdp.cli`,
runs it).

``meters`` (what a step holds), ``workloads`` (synthetic steps to measure), ``alignment`` (gradient
alignment), and ``subnetdp bench``: ``bench`` (its memory part), ``timing`` (its torchrun worker),
``tables`` (its tables and plots). What a plan's workers will hold is predicted in
:mod:`subnetdp.planning`; bytes handed to collectives come from :mod:`subnetdp.sync`.
"""
