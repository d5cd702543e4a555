"""Experiment trackers fed what ``metrics.jsonl`` gets (component kind ``logger``)."""
