"""infomax launchers (SLURM via submitit): built by the SLURM issue; wraps pretrain.main.train."""
