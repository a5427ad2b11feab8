"""Is a label that stands out among the instance scores the model's or a fault? (issue 23; method §3.)

Tasks draw their classes in random order and label them by position (``data/pool.py``), so a label
is not a class: a label whose instances score differently can only come from the model, whose
meta-learned output head (row ``c`` of ``head.weight``, ``head.bias[c]``) is not symmetric across
label positions. This script shows it: it scores the support instances of a run with ``method=if``
(the final point), then permutes the head's rows by ``pi`` and scores again. The permuted model on
label ``y`` is the original model on label ``pi^{-1}(y)``, so if the effect is the head's, the label
that stood out moves to ``pi(label)``; a fault tied to label positions (data, tables) would not move.
Also prints each label's head-row norm and bias.

    python scripts/label_asymmetry.py outputs/train/<run>
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from metaif_cli.reports.intervals import mean_ci95
from metaif_cli.score.config import ScoreConfig
from metaif_cli.score.methods import run_method
from metaif_cli.score.run import load_run


def per_label(run, cfg) -> list[tuple[float, float]]:
    support = run_method(run, cfg).scores.support.double().numpy()  # [n, S]
    labels = run.exp.pools["train"].y_spt.numpy()  # [n, S]
    return [mean_ci95(support[labels == c]) for c in range(int(labels.max()) + 1)]


def main(run_dir: str) -> None:
    run = load_run(Path(run_dir), "cpu")
    cfg = ScoreConfig(run=run_dir, unit="instance", progress=False, plots=False)
    cfg = dataclasses.replace(cfg, ensemble=dataclasses.replace(cfg.ensemble, checkpoints=1))
    ways = run.lam["head.bias"].shape[0]
    pi = np.roll(np.arange(ways), 1)  # [N-1, 0, 1, ...]: new row pi[c] = old row c, i.e. new row c = old row c + 1
    before = per_label(run, cfg)
    permuted = {k: v.clone() for k, v in run.lam.items()}
    for name in ("head.weight", "head.bias"):
        permuted[name][torch.as_tensor(pi)] = run.lam[name]  # new row pi(c) = old row c
    after = per_label(dataclasses.replace(run, lam=permuted), cfg)
    norms = run.lam["head.weight"].norm(dim=1).tolist()
    print("label  head|w|  head b   mean support score (original)   (new row c = old row c+1)")
    for c in range(ways):
        print(f"{c:5d}  {norms[c]:7.3f}  {float(run.lam['head.bias'][c]):+.3f}   "
              f"{before[c][0]:+.3e} +- {before[c][1]:.1e}        {after[c][0]:+.3e} +- {after[c][1]:.1e}")
    top = int(np.argmax([m for m, _ in before]))
    moved = int(np.argmax([m for m, _ in after]))
    verdict = "follows the head's rows: the model's" if moved == (top - 1) % ways else "does not follow the head's rows"
    print(f"highest label: {top} originally, {moved} with the head rows moved ({verdict})")


if __name__ == "__main__":
    main(sys.argv[1])
