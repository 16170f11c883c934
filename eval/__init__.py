"""infomax eval stage (linear probes, kNN, AlexNet baselines): built by the eval issue; reads only exported encoders."""
