"""SLURM (or local) jobs via submitit that call infomax.train.main.train and infomax.eval.main.evaluate."""
