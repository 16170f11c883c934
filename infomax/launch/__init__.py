"""The commands, above both stages: pretraining (with the eval to come), SLURM (or local) jobs via submitit that
call infomax.train.main.train and infomax.eval.main.evaluate."""
