"""The ``metaif train`` command package: config, experiment building, the training loop with
resume, and the Hydra entry point (SPEC section 1)."""
