"""Cohort tables, splits, in-memory bag datasets and synthetic data."""
