"""infomax launchers: SLURM (or local) jobs via submitit that call pretrain.main.train and eval.main.evaluate."""
