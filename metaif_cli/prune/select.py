"""Which units to remove, per method and fraction (method §6, E1-E3).

For a fraction ``f`` of ``n`` units, ``k = max(1, floor(f n + 1/2))`` units are removed:
the first ``k`` of the method's :class:`~metaif_cli.prune.scores.Ranking` (``rank`` 1 =
most harmful). Two rankings are not scores:

- ``oracle``: the units recorded corrupted in ``tasks.csv``, in a seeded random order.
  It removes ``min(#corrupted, k)`` units, all corrupted: when ``k`` exceeds the number
  of corrupted units it removes exactly the corrupted ones and no clean unit (an oracle
  knows which units are bad; removing clean ones as filler would only blur the
  comparison). Ties among corrupted units are broken by the prune ``seed``.
- ``retrain`` (the paper's "Retrain" row): units ranked by their actual leave-one-out
  ``delta_test_loss`` from cold retraining (:mod:`metaif_cli.prune.loo`), most negative
  first, over ``retrain_subset`` seeded units (all units when null). Like the oracle it
  removes ``min(subset size, k)`` units, only from the retrained subset.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd

from metaif_cli.prune.scores import Ranking
from metaif_cli.prune.units import Unit


def num_to_remove(fraction: float, n: int) -> int:
    """``k = max(1, round-half-up(f n))`` units of ``n``."""
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def select(ranking: Ranking, fraction: float, n: int) -> list[Unit]:
    """The units ``ranking`` removes at ``fraction`` of ``n`` units."""
    k = num_to_remove(fraction, n)
    if ranking.limit is not None:
        k = min(k, ranking.limit)
    return [Unit.parse(i) for i in ranking.table.sort_values("rank", kind="stable").unit_id.iloc[:k]]


def oracle_ranking(flags: pd.Series, seed: int) -> Ranking:
    """Corrupted units first (seeded order), then the clean ones; at most ``#corrupted`` removed."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    ids = flags.index.to_numpy()
    bad, good = ids[flags.to_numpy()], ids[~flags.to_numpy()]
    order = np.concatenate([rng.permutation(bad), rng.permutation(good)])
    table = pd.DataFrame({"unit_id": order, "score": np.where(flags.loc[order].to_numpy(), -1.0, 0.0),
                          "rank": np.arange(1, len(order) + 1), "corrupted": flags.loc[order].to_numpy()})
    return Ranking("oracle", table, "minus_recorded_corrupted", time.perf_counter() - t0, "tasks.csv",
                   limit=int(len(bad)), settings={"seed": seed})


def retrain_ranking(loo: pd.DataFrame, flags: pd.Series, seconds: float) -> Ranking:
    """Rank the retrained units by actual ``delta_test_loss`` (``loo``: ``unit_id, actual_delta_test_loss``)."""
    table = loo[["unit_id", "actual_delta_test_loss"]].rename(columns={"actual_delta_test_loss": "score"})
    table = table.sort_values(["score", "unit_id"], kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    table["corrupted"] = flags.loc[table.unit_id].to_numpy()
    return Ranking("retrain", table, "actual_delta_test_loss", seconds, "leave-one-out retraining (cold)",
                   limit=len(table))


def removed_corrupted_fraction(units: list[Unit], flags: pd.Series) -> float:
    """Share of all recorded corrupted units that ``units`` removes (recall; NaN when none is corrupted)."""
    total = int(flags.sum())
    if total == 0:
        return float("nan")
    return float(flags.loc[[u.id for u in units]].sum()) / total
