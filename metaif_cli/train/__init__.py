"""The ``metaif train`` command package: config, experiment building, the training loop with
resume, batched retraining of many runs as one stack of models, and the Hydra entry point
(method §1 and §5)."""
