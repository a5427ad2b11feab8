"""Datasets, their registry and the seeded task pools drawn from them (SPEC sections 1 and 6)."""
