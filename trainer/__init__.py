"""zerotune trainer: everything inside one rank (env detection, config, data, engine, loop).

A rank only needs this package; ``launcher`` (CLI, pre-flight, spawning, Slurm) imports it,
never the other way round.
"""

__version__ = "0.1.0"
