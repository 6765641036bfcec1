"""Continual-learning metrics: pure functions over the accuracy matrix (Avalanche plugin metrics to come)."""
