"""The matplotlib setup every figure module shares: the Agg backend (plots work without a
display) and the axis label of the score sign convention (method §3).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "SCORE_LABEL"]

SCORE_LABEL = "pred_delta_test_loss (negative = harmful)"
