"""Evaluation of generated cells against real ones: distribution metrics and baselines."""
