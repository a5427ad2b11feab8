"""Names of every file metaif writes, in one place (STYLE, kronfluence's constants); the score
column's sign convention (method §3)."""

# metaif train
TASKS_CSV = "tasks.csv"
SPLIT_JSON = "class_split.json"
METRICS_CSV = "metrics.csv"
CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_PREV = "checkpoint_prev.pt"  # the one before checkpoint_last.pt, should that be damaged
MODEL_PT = "model.pt"
CHECKPOINT_DIR = "checkpoints"
RESULTS_JSON = "results.json"
TRAIN_CONFIG_JSON = "train_config.json"
WEIGHTS_PT = "weights.pt"
TRAINING_CURVES_PNG = "training_curves.png"
DATA_FINGERPRINT_JSON = "data_fingerprint.json"  # the content fingerprint of the images the run used

# metaif score
TASK_SCORES_CSV = "task_scores.csv"
INSTANCE_SCORES_CSV = "instance_scores.csv"
TRAIN_BY_TEST_CSV = "train_by_test_scores.csv"
IHVP_PT = "ihvp.pt"
PRED_DELTA_LAM_PT = "pred_delta_lam.pt"
SCORE_JSON = "score.json"
SCORE_SETTINGS_JSON = "score_settings.json"
SCORE_DISTRIBUTION_PNG = "score_distribution_{unit}.png"
DETECTION_CURVE_PNG = "detection_curve_{unit}.png"
INSTANCE_GRID_PNG = "instances_harmful_helpful.png"
SHARD_DIR = "shards"

# metaif prune-and-retrain
PRUNE_RESULTS_CSV = "prune_results.csv"
LOO_RESULTS_CSV = "loo_results.csv"
LOO_SUMMARY_JSON = "loo_summary.json"
MAIN_TABLE_CSV = "main_table.csv"
MAIN_TABLE_MD = "main_table.md"
SUMMARY_MD = "summary.md"  # every command's conclusion in words (score, prune-and-retrain)
ACCURACY_PNG = "accuracy_vs_fraction.png"
PRED_VS_ACTUAL_PNG = "pred_vs_actual_{retrain}.png"
RETRAIN_DIR = "retrains"
SELECTION_DIR = "selection"
PRUNE_CONFIG_JSON = "prune_config.json"
PRUNE_SUMMARY_JSON = "prune_summary.json"
LDS_RESULTS_CSV = "lds_results.csv"
LDS_SUBSETS_CSV = "lds_subsets.csv"
LDS_SUMMARY_JSON = "lds_summary.json"
LDS_SCATTER_PNG = "lds_scatter.png"

# the sign convention, stated in every score column name (method §3)
SCORE_COLUMN = "pred_delta_test_loss"

FORMAT_VERSION = 1
