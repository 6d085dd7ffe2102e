"""Scoring masks against references."""
