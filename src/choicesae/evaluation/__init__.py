"""Held-out metrics, inference thresholds, spliced loss, reports, the feature browser and
checks of stores and runs."""
