"""Scaling studies of compute cost: ``zerotune estimate`` (estimate.py, shape.py,
calibrate.py), ``zerotune sweep`` (sweep.py, slurm.py, collect.py) and ``zerotune report``
(report.py); ``cli.py`` is their command line. Depends on ``trainer`` only: the sweep gets
the launcher's pre-flight passed in, and runs points as ``zerotune train`` / ``submit``
subprocesses.
"""
