"""Activations: files, the store, harvesting from models, text and synthetic data."""
