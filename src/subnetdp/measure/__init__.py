"""Measurement, which reads the core and is never read by it.

``meters`` (what a step holds), ``prediction`` (what a plan's workers will hold), ``workloads``
(synthetic steps to measure), ``planner`` (the memory-budget planner), ``alignment`` (gradient
alignment), and ``subnetdp bench``: ``bench`` (its memory part), ``timing`` (its torchrun worker),
``tables`` (its tables and plots); bytes handed to collectives come from :mod:`subnetdp.sync`.
"""
