"""What any long run needs, whatever it trains: processes and collectives, the machine, devices,
run dirs, checkpoints, stop signals, tracking, the revision."""
