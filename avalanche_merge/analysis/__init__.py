"""Plots and tables of stored runs."""
