"""Tracking: the run's local journal, its delivery to MLflow (the one layer over MLflow), and the mask pictures."""
