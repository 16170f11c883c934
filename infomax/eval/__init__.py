"""The eval stage: linear probes and kNN on frozen exported encoders, beside supervised baselines; reads
only exports."""
