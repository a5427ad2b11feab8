"""Datasets, their registry and the seeded task pools drawn from them (method §1 and §6)."""
