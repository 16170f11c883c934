"""The export (weights timm loads, config.json) and its model card."""
