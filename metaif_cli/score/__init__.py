"""The ``metaif score`` command package: config, loading a run, method dispatch, the pipeline
(shards, torchrun), outputs and the Hydra entry point (method §2-4)."""
