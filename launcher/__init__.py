"""zerotune launcher: everything before ranks exist — CLI, pre-flight, spawning, Slurm."""
