"""``protocol=lds``: the linear datamodeling score of every scoring method (method §5).

1. Subsets: ``lds.num_subsets`` (M) random subsets of the units of ``unit=task|support|query``,
   each keeping ``round(lds.fraction * N)`` of the ``N`` units, drawn from the prune ``seed``
   (``numpy.random.default_rng(seed)``, one permutation per subset). Removal is weight 0.
2. Retrainings: every subset ``lds.seeds`` (R) times, cold (the run's pool, budget and
   optimiser), varying the batch order, the initialisation or both (``lds.vary``;
   :mod:`~metaif_cli.prune.seeds`); retraining 0 keeps the run's own, so ``lds.seeds=1``
   measures same-seed cold retraining. The full pool is retrained with the same R-1 other
   seeds (its retraining 0 is the run itself) to measure the noise of ``f`` alone.
   Retrainings go through the launchers and live in ``lds.retrain_dir`` (default
   ``lds-retrains/<run>-<config digest>/`` beside the output directory), named by their
   content (removed units and seeds), so every method, Hessian form and rerun shares them
   and a finished one is never trained again.
3. Target of a subset: ``f`` of each retraining, the evaluation function the scores use
   (``score.evaluation``: mean query loss after adaptation on the meta-test tasks, or the
   margin), averaged over the R retrainings. With ``score.evaluation.kind=per_task`` also
   one target per meta-test task.
4. Prediction of a method: ``f(lam*) + sum over the removed units of its score column``
   (scored once on the original run, never on a retraining). For the influence methods
   (``if``, ``direct_if``, ``grad_sim``, ``tracin``, ``ekfac_if``, ``trak``) the column is
   ``pred_delta_test_loss``, a predicted loss change (``trak``'s on its own scale); ``loss`` (``neg_loss_after_adaptation``) and ``random``
   (``random_score``) are not loss changes but share the orientation "negative = harmful-
   looking", so removing harmful-looking units predicts a lower loss. Only the order of the
   predictions across subsets enters the LDS. Per test task (``per_task``, task units),
   methods with per-test-task scores (``if``, ``direct_if``, ``grad_sim``) predict each test
   task with its own column; the others with their one column for every test task.
5. Statistics (:mod:`metaif_cli.reports.lds`): LDS with a 95% bootstrap interval over
   subsets, the noise ceiling (split-half reliability over seeds, Spearman-Brown corrected),
   their ratio, the null band of an unrelated prediction, and the standard deviation of ``f``
   over the R retrainings of the full pool beside that across subsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.io import load_json, resolved_path, save_csv, save_json
from metaif_cli.prune import report
from metaif_cli.prune.launch import IGNORED_KEYS, RetrainJob
from metaif_cli.prune.loo import load_lam
from metaif_cli.prune.lds_predictions import method_scores, predictions
from metaif_cli.prune.scores import SCORING_METHODS
from metaif_cli.prune.seeds import SeedVariant, seed_variants, with_seeds
from metaif_cli.prune.units import Unit
from metaif_cli.prune.update import retrain_job
from metaif_cli.reports import lds as stats

log = logging.getLogger(__name__)

LDS_METHODS = SCORING_METHODS  # every scoring method (oracle and retrain predict no loss change)
RESULT_COLUMNS = ["method", "unit", "lds", "lds_ci_low", "lds_ci_high", "ceiling", "lds_over_ceiling",
                  "num_subsets", "seeds", "fraction", "scoring_seconds"]
PER_TASK_COLUMNS = ["lds_per_task", "lds_per_task_ci_low", "lds_per_task_ci_high", "ceiling_per_task"]
ORIENTATION = ("prediction = f(lam*) + sum over the removed units of the method's score column; "
               "pred_delta_test_loss (if, direct_if, grad_sim, tracin, ekfac_if, trak) is a predicted loss change "
               "(trak's on its own scale); "
               "neg_loss_after_adaptation (loss) and random_score (random) are not, but share its orientation "
               "(negative = harmful-looking), so removing harmful-looking units predicts a lower loss; "
               "only the order of the predictions across subsets enters the LDS")
F_VALUES_JSON = "f_values.json"  # cached f per meta-test task, inside each retraining's directory


# ---------------------------------------------------------------------------------- subsets, jobs


def check_fraction(fraction: float, n: int) -> int:
    """The units a subset keeps, ``round(fraction n)``; MetaifError unless it keeps one and removes one."""
    keep = int(round(fraction * n))
    if not 0 < keep < n:
        raise MetaifError(f"lds.fraction={fraction} keeps {keep} of the {n} units; choose a fraction that keeps at "
                          "least one unit and removes at least one")
    return keep


def check_methods(methods: list[str]) -> list[str]:
    """The methods of ``methods`` that predict a loss change; MetaifError when there is none."""
    kept = [m for m in methods if m in LDS_METHODS]
    if not kept:
        raise MetaifError("protocol=lds needs at least one of the methods " + ", ".join(LDS_METHODS))
    return kept


def draw_subsets(n: int, num: int, fraction: float, seed: int) -> list[np.ndarray]:
    """``num`` sorted index arrays of the units *removed* from ``n``; each subset keeps ``round(fraction n)``."""
    keep = check_fraction(fraction, n)
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(n)[: n - keep]) for _ in range(num)]


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def retrain_root(cfg, run_dir: Path, train_config: dict, out_dir: Path) -> Path:
    """Where the LDS retrainings of this run live (shared by every method, setting and rerun)."""
    if cfg.lds.retrain_dir:
        base = Path(resolved_path(cfg.lds.retrain_dir))  # ~ and $VAR expanded
    else:
        base = out_dir.parent / "lds-retrains"
    plain = {k: v for k, v in train_config.items() if k not in IGNORED_KEYS}
    return base / f"{run_dir.name}-{_digest(plain)}"


def job_dir(root: Path, unit: str, removed_ids: list[str], variant: SeedVariant) -> Path:
    """``full-<seeds>`` or ``<unit>-<digest of the removed ids>-<seeds>``."""
    name = "full" if not removed_ids else f"{unit}-{_digest(sorted(removed_ids))}"
    return root / f"{name}-{variant.tag}"


@dataclass
class LdsPlan:
    """The subsets, the seed variants and one retraining job per (seed, subset)."""

    units: list[Unit]
    subsets: list[np.ndarray]
    variants: list[SeedVariant]
    root: Path
    imported: bool = False  # trained elsewhere: the full pool's retraining 0 is retrained here too

    def removed(self, i: int) -> list[Unit]:
        return [self.units[j] for j in self.subsets[i]]

    def subset_dir(self, i: int, r: int) -> Path:
        return job_dir(self.root, self.units[0].kind, [u.id for u in self.removed(i)], self.variants[r])

    def full_dir(self, r: int) -> Path:
        return job_dir(self.root, self.units[0].kind, [], self.variants[r])


def plan_lds(ctx) -> LdsPlan:
    """Subsets and seeds from the prune ``seed``; the shared retraining folder of the run."""
    cfg, run = ctx.cfg, ctx.run
    subsets = draw_subsets(len(ctx.units), cfg.lds.num_subsets, cfg.lds.fraction, cfg.seed)
    variants = seed_variants(run.train_cfg, cfg.lds.seeds, cfg.seed, cfg.lds.vary)
    probe = retrain_job(run, [], Path("."))
    imported = bool(load_json(run.run_dir / C.RESULTS_JSON, f"rerun the command that wrote {run.run_dir}")
                    .get("imported_from"))
    return LdsPlan(ctx.units, subsets, variants, retrain_root(cfg, run.run_dir, probe.config, ctx.out_dir), imported)


def lds_jobs(ctx, plan: LdsPlan) -> tuple[list[RetrainJob], list[tuple[int, int]]]:
    """Jobs grouped by seed (one experiment per config in each worker); keys ``(subset, seed)``, subset -1 = full."""
    jobs, keys = [], []
    for r, variant in enumerate(plan.variants):
        if r > 0 or plan.imported:  # retraining 0 of the full pool is the run itself (unless imported)
            jobs.append(with_seeds(retrain_job(ctx.run, [], plan.full_dir(r)), variant))
            keys.append((-1, r))
        for i in range(len(plan.subsets)):
            jobs.append(with_seeds(retrain_job(ctx.run, plan.removed(i), plan.subset_dir(i, r)), variant))
            keys.append((i, r))
    return jobs, keys


# ---------------------------------------------------------------------------------- targets


def _eval_settings(ctx) -> dict:
    s = ctx.cfg.score
    return {"evaluation": asdict(s.evaluation), "dtype": s.dtype or ctx.run.train_cfg.dtype}


def f_values(ctx, run_dir: Path | None) -> np.ndarray:
    """``f`` per meta-test task ``[T]`` of a retraining (cached in its directory), or of the run (None)."""
    if run_dir is None:
        return ctx.f.values(ctx.run.lam)
    path = run_dir / F_VALUES_JSON
    settings = _eval_settings(ctx)
    try:  # our own cache: a damaged one is computed again
        saved = load_json(path, "it is computed again") if path.exists() else {}
    except MetaifError as exc:
        log.warning("%s", exc)
        saved = {}
    if saved:
        if saved.get("settings") == settings and saved.get("model_mtime") == (run_dir / C.MODEL_PT).stat().st_mtime_ns:
            return np.asarray(saved["values"], dtype=np.float64)
    values = ctx.f.values(load_lam(run_dir))
    save_json({"settings": settings, "model_mtime": (run_dir / C.MODEL_PT).stat().st_mtime_ns,
               "values": values.tolist()}, path)
    return values


def gather_targets(ctx, plan: LdsPlan) -> tuple[np.ndarray, np.ndarray]:
    """Targets per subset, seed and test task ``[M, R, T]`` and of the full pool per seed ``[R, T]``."""
    first = f_values(ctx, plan.full_dir(0) if plan.imported else None)
    full = [first] + [f_values(ctx, plan.full_dir(r)) for r in range(1, len(plan.variants))]
    subsets = [[f_values(ctx, plan.subset_dir(i, r)) for r in range(len(plan.variants))]
               for i in range(len(plan.subsets))]
    return np.asarray(subsets), np.asarray(full)


# ---------------------------------------------------------------------------------- the protocol


def _finite(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def lds_protocol(ctx, gather: Callable) -> dict:
    """Retrain the subsets, score every method once, report the LDS against the noise ceiling."""
    cfg, lcfg = ctx.cfg, ctx.cfg.lds
    methods = check_methods(cfg.methods)
    skipped = [m for m in cfg.methods if m not in LDS_METHODS]
    if skipped:
        log.info("protocol=lds skips %s: they predict no loss change", ", ".join(skipped))
    plan = plan_lds(ctx)
    jobs, keys = lds_jobs(ctx, plan)
    log.info("LDS: %d subsets x %d seeds of %d %s units (keep %.2f), %d retrainings in %s", len(plan.subsets),
             len(plan.variants), len(plan.units), cfg.unit, lcfg.fraction, len(jobs), plan.root)
    results = ctx.launch(jobs)
    retrain_seconds = float(sum(r["train_seconds"] for r in results))
    targets, full = gather_targets(ctx, plan)  # [M, R, T], [R, T]
    per_task = cfg.score.evaluation.kind == "per_task"
    target = targets.mean(2)  # [M, R]: f of each retraining (mean over test tasks)
    mean_target = target.mean(1)  # [M]
    target_t = targets.mean(1)  # [M, T]
    ceiling = stats.noise_ceiling(target, cfg.seed)
    ceiling_t = stats.noise_ceiling(targets, cfg.seed) if per_task else None
    f_full = f_values(ctx, None) if plan.imported else full[0]  # [T]: f(lam*) of the scored model
    rows, preds, columns = [], {}, {}
    for method in methods:
        s = method_scores(ctx, method, gather)
        pred, pred_t = predictions(plan.subsets, len(plan.units), s, f_full)
        preds[method] = pred
        columns[method] = s.ranking.column
        value = stats.lds(pred, mean_target)
        low, high = stats.bootstrap_ci(pred, mean_target, lcfg.bootstrap, cfg.seed)
        row = {"method": method, "unit": cfg.unit, "lds": value, "lds_ci_low": low, "lds_ci_high": high,
               "ceiling": ceiling, "lds_over_ceiling": stats.ratio(value, ceiling), "num_subsets": len(plan.subsets),
               "seeds": len(plan.variants), "fraction": lcfg.fraction, "scoring_seconds": s.ranking.seconds}
        if per_task:
            low_t, high_t = stats.bootstrap_ci(pred_t, target_t, lcfg.bootstrap, cfg.seed)
            row.update({"lds_per_task": stats.lds(pred_t, target_t), "lds_per_task_ci_low": low_t,
                        "lds_per_task_ci_high": high_t, "ceiling_per_task": ceiling_t})
        rows.append(row)
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS + (PER_TASK_COLUMNS if per_task else []))
    subsets = pd.DataFrame([{"subset": i, "seed": r, "num_removed": len(plan.subsets[i]), "target": target[i, r],
                             **{f"pred_{m}": preds[m][i] for m in methods}}
                            for i in range(len(plan.subsets)) for r in range(len(plan.variants))])
    full_f = full.mean(1)  # [R]
    summary = {
        "run": str(ctx.run.run_dir), "protocol": "lds", "unit": cfg.unit, "num_units": len(plan.units),
        "num_subsets": len(plan.subsets), "seeds": len(plan.variants), "fraction": lcfg.fraction,
        "num_removed": int(len(plan.subsets[0])), "vary": lcfg.vary, "seed": cfg.seed,
        "evaluation": asdict(cfg.score.evaluation), "orientation": ORIENTATION, "score_columns": columns,
        "seed_variants": [v.as_dict() for v in plan.variants],
        "f_full": float(f_full.mean()), "f_full_seeds": full_f.tolist(),
        "sd_f_full_over_seeds": _finite(full_f.std(ddof=1)) if len(full_f) > 1 else None,
        "sd_target_across_subsets": float(mean_target.std(ddof=1)),
        "sd_f_across_subsets_single_seed": float(target[:, 0].std(ddof=1)),
        "sd_f_within_subsets_over_seeds": _finite(target.std(1, ddof=1).mean()) if target.shape[1] > 1 else None,
        "split_half": _finite(stats.split_half(target, cfg.seed)) if target.shape[1] > 1 else None,
        "ceiling": _finite(ceiling), "ceiling_per_task": _finite(ceiling_t) if per_task else None,
        "null_band": stats.null_band(len(plan.subsets)), "bootstrap": lcfg.bootstrap,
        "retrain_dir": str(plan.root), "retrain_seconds": retrain_seconds,
        "subsets_removed": [[plan.units[j].id for j in idx] for idx in plan.subsets],
        "methods": {r["method"]: {k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows},
    }
    paths = write_lds_outputs(ctx.out_dir, table, subsets, summary, mean_target, preds,
                              f"{ctx.run.run_dir.name}: LDS of {cfg.unit} removal (keep {lcfg.fraction:g}, "
                              f"M={len(plan.subsets)}, R={len(plan.variants)})")
    summary["outputs"] = paths
    save_json(summary, ctx.out_dir / C.LDS_SUMMARY_JSON)
    log.info("LDS by method (ceiling %.3f, null band +-%.3f, sd of f: full pool over seeds %s, across subsets "
             "%.4f):\n%s", ceiling, summary["null_band"], summary["sd_f_full_over_seeds"],
             summary["sd_target_across_subsets"], compact(table))
    lines = report.write_lds_summary(ctx.out_dir, table, preds, mean_target, summary["null_band"], lcfg.bootstrap, cfg.seed)
    log.info("conclusion (also in %s):\n%s", C.SUMMARY_MD, "\n".join(lines[2:]))
    return {**summary, "results": table}


def write_lds_outputs(out_dir: Path, table: pd.DataFrame, subsets: pd.DataFrame, summary: dict,
                      mean_target: np.ndarray, preds: dict[str, np.ndarray], title: str) -> dict[str, str]:
    """``lds_results.csv``, ``lds_subsets.csv``, ``lds_scatter.png`` (the summary is written by the caller)."""
    save_csv(table, out_dir / C.LDS_RESULTS_CSV)
    save_csv(subsets, out_dir / C.LDS_SUBSETS_CSV)
    results = {r["method"]: r for r in table.to_dict("records")}
    stats.plot_lds_scatter(mean_target, preds, results, out_dir / C.LDS_SCATTER_PNG, title)
    return {"lds_results": str(out_dir / C.LDS_RESULTS_CSV), "lds_subsets": str(out_dir / C.LDS_SUBSETS_CSV),
            "lds_summary": str(out_dir / C.LDS_SUMMARY_JSON), "lds_scatter": str(out_dir / C.LDS_SCATTER_PNG)}


def compact(table: pd.DataFrame) -> str:
    """One line per method: LDS with its interval, the ceiling, the ratio and the scoring seconds."""
    cols = ["method", "lds", "lds_ci_low", "lds_ci_high", "ceiling", "lds_over_ceiling", "scoring_seconds"]
    cols += [c for c in ("lds_per_task", "ceiling_per_task") if c in table]
    out = table[cols].rename(columns={"lds_ci_low": "ci_low", "lds_ci_high": "ci_high", "lds_over_ceiling": "ratio",
                                      "scoring_seconds": "score_s"})
    return out.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-")
