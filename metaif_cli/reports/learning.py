"""Did a training run learn? (method §1: N-way tasks, chance accuracy ``1/N``, chance loss ``ln N``;
section 6: intervals over test tasks).

A run "did not learn" when its meta-test accuracy lies within its 95% interval of chance, or its
training loss stayed flat (its last quarter no lower than its first steps, or at ``ln N``, the loss
of a uniform guess). The reasons are words for a warning; an empty list means it learned.
"""

from __future__ import annotations

import math

import numpy as np

FLAT_RELATIVE = 0.02  # a loss within 2% of where it started (or of ln N) is flat


def not_learned_reasons(test_acc: float, test_acc_ci95: float, ways: int,
                        train_loss: np.ndarray | None = None) -> list[str]:
    """Why a run looks as if it learned nothing (empty: it learned).

    Args:
        test_acc, test_acc_ci95: meta-test accuracy and the half-width of its 95% interval.
        ways: classes per task (chance accuracy ``1 / ways``).
        train_loss: the training loss by step, oldest first (None: not checked).
    """
    chance = 1.0 / ways
    reasons = []
    if abs(test_acc - chance) <= test_acc_ci95 + 1e-9:
        reasons.append(f"meta-test accuracy {test_acc:.4f} +- {test_acc_ci95:.4f} is within its interval of chance "
                       f"(1/{ways} = {chance:.4f})")
    losses = np.asarray([] if train_loss is None else train_loss, dtype=float)
    losses = losses[np.isfinite(losses)]
    if losses.size >= 8:
        head = float(losses[: max(1, losses.size // 20)].mean())
        tail = float(losses[-max(2, losses.size // 4):].mean())
        uniform = math.log(ways)
        if tail >= head * (1 - FLAT_RELATIVE):
            reasons.append(f"the training loss stayed flat ({head:.4f} at the start, {tail:.4f} over the last "
                           "quarter of the steps)")
        elif abs(tail - uniform) <= FLAT_RELATIVE * uniform:
            reasons.append(f"the training loss ended at {tail:.4f}, the loss of a uniform guess (ln {ways} = "
                           f"{uniform:.4f})")
    return reasons


def not_learned_advice(reasons: list[str]) -> str:
    """One warning line naming the reasons and what to try."""
    return ("the run did not learn: " + "; ".join(reasons) + ". Try: another optim.lr (e.g. 10x lower or higher) "
            "or meta.inner_lr, more optim.steps, and check the data (images and labels per class: dataset.* and "
            "the folder's layout); influence scores of such a model describe noise")
