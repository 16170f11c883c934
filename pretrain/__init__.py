"""infomax pretraining: config, data, models, bounds, objectives, distributed gather, engine, checkpoints, export."""
