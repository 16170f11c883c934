"""The two stages' schemas (typed dataclasses) and what they share: fields, YAML + CLI merge, checks."""
