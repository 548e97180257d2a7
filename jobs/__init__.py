"""Launchers: submitit jobs for single stages or the whole chain, on Slurm or locally."""
