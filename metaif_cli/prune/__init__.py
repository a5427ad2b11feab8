"""``metaif prune-and-retrain``: remove harmful data, retrain or edit, compare methods (method §5-6).

One module per job: :mod:`~metaif_cli.prune.units` (units and zero weights),
:mod:`~metaif_cli.prune.scores` (rankings per scoring method), :mod:`~metaif_cli.prune.select`
(what to remove; ``oracle`` and ``retrain``), :mod:`~metaif_cli.prune.update` (retrain, edit,
gradient ascent), :mod:`~metaif_cli.prune.loo` (leave-one-out ground truth),
:mod:`~metaif_cli.prune.seeds` (batch orders of repeated retrainings), :mod:`~metaif_cli.prune.lds`
and :mod:`~metaif_cli.prune.lds_predictions` (the linear datamodeling score),
:mod:`~metaif_cli.prune.launch` (sequential, joblib, submitit), :mod:`~metaif_cli.prune.report`
(tables and plots), :mod:`~metaif_cli.prune.pipeline` (the command as a function),
:mod:`~metaif_cli.prune.config` (its typed config) and :mod:`~metaif_cli.prune.command` (the
Hydra entry point).
"""
