"""Experiments: settings, metrics, repeated splits, results as data, reports and plots."""
