"""The command line: flags, the task and penalty registries, sweeps."""
