"""infomax pretraining: config, data, models, bounds, objectives, distributed gather, the train step,
frozen features, stop signals, tracking, checkpoints, export."""
