"""Slurm side of the pipeline: sbatch scripts (*.sbatch, *.sh) and a one-machine test cluster (local_cluster)."""
