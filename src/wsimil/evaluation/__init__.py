"""Metrics with bootstrap confidence intervals."""
