"""``metaif prune-and-retrain`` as a library function (method §5-6, E1-E4).

``protocol=remove``: rank the units of one kind (``unit=task|support|query``) by every
method, remove the most harmful fraction, update the model (retrain with zero weights,
edit by influence, or gradient ascent), evaluate on the meta-test pool, and report the
accuracy against the fraction removed with each method's selection runtime, beside the
unpruned baseline (method ``none``, fraction 0). ``protocol=loo``: leave-one-out
retraining of a seeded sample of units, cold and/or warm, against the influence
predictions.

Every retraining reuses the trained run's saved config (seed, initialisation, batch
order, budget) and lives under ``retrains/``; a rerun of the same command skips the
finished ones and the cached rankings in ``selection/``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from metaif_cli import constants as C
from metaif_cli.io import clean_stale_temporaries, load_json, resolved_path, save_json
from metaif_cli.ownership import check_foreign, owned_dir
from metaif_cli.prune import report
from metaif_cli.prune.launch import launch
from metaif_cli.prune.lds import lds_protocol
from metaif_cli.prune.loo import EvalFunction, LooRetrains, loo_table, run_loo, sample_units
from metaif_cli.prune.scores import (Ranking, compute_ranking, load_ranking, read_scores_dir, save_ranking,
                                     score_config_for)
from metaif_cli.prune.seeds import mean_t_interval, seed_variants, with_seeds
from metaif_cli.prune.select import oracle_ranking, removed_corrupted_fraction, retrain_ranking, select
from metaif_cli.prune.units import Unit, all_units, corrupted_flags
from metaif_cli.prune.update import IFEditor, evaluate, grad_ascent, retrain_job
from metaif_cli.prune.config import PruneConfig
from metaif_cli.prune.preflight import check_prune
from metaif_cli.score.config import settings_of
from metaif_cli.score.run import LoadedRun, load_run, read_tasks_csv

log = logging.getLogger(__name__)
RERUN_TRAIN = "rerun the metaif train command that wrote {run} to rewrite it"


@dataclass
class Context:
    """What every step needs: the config, the output directory, the loaded run and its units."""

    cfg: PruneConfig
    out_dir: Path
    run: LoadedRun
    flags: pd.Series  # recorded corruption by unit id
    units: list[Unit]
    given: Ranking | None = None  # the ranking of scores=, read and checked up front
    _f: EvalFunction | None = None

    @property
    def retrain_root(self) -> Path:
        return self.out_dir / C.RETRAIN_DIR

    @property
    def f(self) -> EvalFunction:
        if self._f is None:
            self._f = EvalFunction(self.run, self.cfg.score)
        return self._f

    def launch(self, jobs):
        c = self.cfg
        return launch(jobs, c.launcher, c.n_jobs, self.out_dir / "submitit", c.progress, batch=c.retrain.size_for(self.run.train_cfg.model.name))


def prune_and_retrain(cfg: PruneConfig, out_dir: Path, before_write: Callable[[], None] | None = None) -> dict:
    """Run ``metaif prune-and-retrain`` into ``out_dir``; return the summary written there.

    Everything is checked before the first write or any scoring (:mod:`metaif_cli.prune.preflight`,
    and ``scores=`` is read in full); ``before_write`` runs then (Hydra's ``.hydra/``). The folder
    is held by this command alone from the first read to the last write.
    """
    with owned_dir(out_dir, "prune-and-retrain"):
        return _prune_and_retrain(cfg, out_dir, before_write)


def _prune_and_retrain(cfg: PruneConfig, out_dir: Path, before_write: Callable[[], None] | None) -> dict:
    run = load_run(cfg.run, cfg.score.device, cfg.score.dtype, data=cfg.data, factory=cfg.score.factory)
    pool = run.exp.pools["train"]
    tasks_csv = read_tasks_csv(run)
    units = all_units(len(pool), pool.spt_idx.shape[1], pool.qry_idx.shape[1], cfg.unit)
    check_foreign(out_dir, "prune-and-retrain", run.run_dir)
    check_prune(cfg, run, units, out_dir)
    given = read_scores_dir(Path(resolved_path(cfg.scores)), run, cfg.unit) if cfg.scores else None
    if before_write is not None:
        before_write()
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out_dir)  # left by a killed earlier run (retrainings included)
    save_json({**dataclasses.asdict(cfg), "run_fingerprint": run.fingerprint}, out_dir / C.PRUNE_CONFIG_JSON)
    ctx = Context(cfg, out_dir, run, corrupted_flags(tasks_csv, cfg.unit), units, given)
    if cfg.protocol == "lds":
        return lds_protocol(ctx, gather_rankings)
    return loo_protocol(ctx) if cfg.protocol == "loo" else remove_protocol(ctx)


# ---------------------------------------------------------------------------------- rankings


def gather_rankings(ctx: Context, methods: list[str]) -> dict[str, Ranking]:
    """One ranking per method: from ``scores=`` for its method, else computed (or cached)."""
    cfg, out = ctx.cfg, {}
    given = ctx.given
    for method in methods:
        if given is not None and given.method == method:
            _warn_if_settings_differ(given, settings_of(score_config_for(cfg, method)))
            out[method] = given
        elif method in ("oracle", "retrain"):
            out[method] = oracle_ranking(ctx.flags, cfg.seed) if method == "oracle" else retrain_by_loo(ctx)
            save_ranking(out[method], ctx.out_dir)  # for the record; not read back
        else:
            settings = settings_of(score_config_for(cfg, method))
            ranking = load_ranking(ctx.out_dir, method, settings)
            if ranking is None:
                ranking = compute_ranking(ctx.run, cfg, method)
                save_ranking(ranking, ctx.out_dir)
            out[method] = ranking
    return out


def _warn_if_settings_differ(given: Ranking, wanted: dict) -> None:
    a = {k: v for k, v in (given.settings or {}).items() if k != "run"}
    b = {k: v for k, v in wanted.items() if k != "run"}
    if a and a != b:
        log.warning("the scores of %s in %s were computed with other settings than score.* here; using them as "
                    "they are", given.method, given.source)


def retrain_by_loo(ctx: Context) -> Ranking:
    """The paper's "Retrain" selection: cold leave-one-out retraining of ``retrain_subset`` units."""
    cfg = ctx.cfg
    subset = sample_units(ctx.units, cfg.retrain_subset, cfg.seed)
    if cfg.retrain_subset is None:
        log.info("method=retrain retrains without each of the %d units (set retrain_subset to sample fewer)",
                 len(subset))
    loo = run_loo(ctx.run, cfg.score, subset, "cold", ctx.retrain_root, cfg.warm_steps, ctx.launch, ctx.f)
    table = pd.DataFrame({"unit_id": [u.id for u in loo.units], "actual_delta_test_loss": loo.delta_f})
    return retrain_ranking(table, ctx.flags, loo.seconds)


# ---------------------------------------------------------------------------------- remove


def remove_protocol(ctx: Context) -> dict:
    """Remove the most harmful fractions by every method, update, evaluate, report."""
    cfg, run = ctx.cfg, ctx.run
    n = len(ctx.units)
    log.info("%s", report.plan_text(cfg, n, report.own_train_seconds(run.run_dir)))
    rankings = gather_rankings(ctx, cfg.methods)
    plan = [(m, f, select(rankings[m], f, n)) for m in cfg.methods for f in cfg.fractions]
    base = _baseline_metrics(ctx)
    rows = [_row(ctx, "none", 0.0, [], base, 0.0, float(base["train_seconds"]) if cfg.update == "retrain" else 0.0)]
    extra: dict = {}
    if cfg.update == "retrain" and cfg.retrain_seeds > 1:
        rows, extra = _remove_over_seeds(ctx, plan, rankings, base)
    elif cfg.update == "retrain":
        jobs = [retrain_job(run, units, ctx.retrain_root / f"{m}-{f:g}", progress=cfg.progress) for m, f, units in plan]
        for (m, f, units), res in zip(plan, ctx.launch(jobs)):
            rows.append(_row(ctx, m, f, units, res, rankings[m].seconds, float(res["train_seconds"])))
    else:
        editor = None
        if cfg.update == "edit":
            editor = IFEditor(run, cfg.score)
            t0 = time.perf_counter()
            extra["edit_damping"] = editor.curvature.damping  # chosen once, not charged to any row
            extra["edit_setup_seconds"] = time.perf_counter() - t0
        for m, f, units in plan:
            t0 = time.perf_counter()
            lam = (editor.edited(units) if editor is not None
                   else grad_ascent(run, units, cfg.grad_ascent_steps, cfg.grad_ascent_lr))
            seconds = time.perf_counter() - t0
            rows.append(_row(ctx, m, f, units, evaluate(run, lam), rankings[m].seconds, seconds))
    if "test_acc_by_retraining" not in extra:  # one model per row
        extra["test_acc_by_retraining"] = {f"{r['method']}@{r['fraction']:g}": [r["test_acc"]] for r in rows[1:]}
        extra["unpruned_test_acc_by_retraining"] = [rows[0]["test_acc"]]
    results = pd.DataFrame(rows)
    title = f"{run.run_dir.name}: {cfg.unit} removal ({cfg.update})"
    paths = report.write_prune_outputs(ctx.out_dir, results, title)
    detection = report.write_detection_curve(ctx.out_dir, rankings, ctx.flags, cfg.unit, cfg.seed)
    if detection is not None:
        paths["detection_plot"] = detection
    summary = {"run": str(run.run_dir), "protocol": "remove", "unit": cfg.unit, "update": cfg.update, "n_units": n,
               "n_corrupted": int(ctx.flags.sum()),
               "rankings": {m: {"seconds": r.seconds, "source": r.source, "column": r.column}
                            for m, r in rankings.items()},
               "outputs": paths, **extra}
    lines = report.write_remove_summary(ctx.out_dir, summary, cfg.retrain_seeds if cfg.update == "retrain" else 1)
    summary["outputs"]["summary"] = str(ctx.out_dir / C.SUMMARY_MD)
    save_json(summary, ctx.out_dir / C.PRUNE_SUMMARY_JSON)
    columns = report.PRUNE_COLUMNS + [c for c in report.SEED_COLUMNS if c in results]
    log.info("test accuracy by method and fraction removed:\n%s", report.compact(results[columns]))
    log.info("conclusion (also in %s):\n%s", C.SUMMARY_MD, "\n".join(lines))
    return {**summary, "results": results[columns]}


def _remove_over_seeds(ctx: Context, plan: list, rankings: dict[str, Ranking], base: dict) -> tuple[list[dict], dict]:
    """``retrain_seeds=R``: every removal (and the unpruned model) retrained with R batch orders.

    ``test_acc`` and ``test_loss`` are means over the seeds, ``test_acc_ci95`` the Student-t
    half-width over them, ``test_acc_sd_seeds`` their standard deviation and
    ``retrain_seconds`` the sum; retraining 0 keeps the run's batch order (its directory is
    today's ``<method>-<fraction>``), the unpruned model's retraining 0 is ``base`` (the run itself,
    or its retraining here when it was imported).
    """
    cfg, run = ctx.cfg, ctx.run
    variants = seed_variants(run.train_cfg, cfg.retrain_seeds, cfg.seed, "batch_order")
    jobs = [with_seeds(retrain_job(run, units, ctx.retrain_root / f"{m}-{f:g}{v.suffix}", progress=cfg.progress), v)
            for v in variants for m, f, units in plan]
    jobs += [with_seeds(retrain_job(run, [], ctx.retrain_root / f"none{v.suffix}", progress=cfg.progress), v)
             for v in variants[1:]]
    results = ctx.launch(jobs)
    k = len(plan)
    per_plan = [[results[r * k + j] for r in range(len(variants))] for j in range(k)]
    baseline = [base] + results[len(variants) * k:]

    def over_seeds(res: list[dict]) -> tuple[dict, float]:
        acc, acc_ci, acc_sd = mean_t_interval([r["test_acc"] for r in res])
        metrics = {"test_acc": acc, "test_acc_ci95": acc_ci, "test_loss": float(np.mean([r["test_loss"] for r in res])),
                   "test_acc_sd_seeds": acc_sd}
        return metrics, float(sum(r["train_seconds"] for r in res))

    base_metrics, base_seconds = over_seeds(baseline)
    rows = [{**_row(ctx, "none", 0.0, [], base_metrics, 0.0, base_seconds), "retrain_seeds": len(variants),
             "test_acc_sd_seeds": base_metrics["test_acc_sd_seeds"]}]
    for (m, f, units), res in zip(plan, per_plan):
        metrics, seconds = over_seeds(res)
        rows.append({**_row(ctx, m, f, units, metrics, rankings[m].seconds, seconds), "retrain_seeds": len(variants),
                     "test_acc_sd_seeds": metrics["test_acc_sd_seeds"]})
    extra = {"retrain_seeds": len(variants), "seed_variants": [v.as_dict() for v in variants],
             "unpruned_test_acc_sd_seeds": base_metrics["test_acc_sd_seeds"],
             "test_acc_by_retraining": {f"{m}@{f:g}": [float(r["test_acc"]) for r in res]
                                        for (m, f, _), res in zip(plan, per_plan)},
             "unpruned_test_acc_by_retraining": [float(r["test_acc"]) for r in baseline]}
    log.info("unpruned model over %d batch orders: test accuracy %.4f, sd %.4f", len(variants),
             base_metrics["test_acc"], base_metrics["test_acc_sd_seeds"])
    return rows, extra


def _baseline_metrics(ctx: Context) -> dict:
    if ctx.cfg.update == "retrain":
        results = load_json(ctx.run.run_dir / C.RESULTS_JSON, RERUN_TRAIN.format(run=ctx.run.run_dir),
                            keys=("test_acc", "test_acc_ci95", "test_loss", "train_seconds"))
        if results.get("imported_from"):  # trained elsewhere: retrain the full pool here, so every row shares one loop
            return ctx.launch([retrain_job(ctx.run, [], ctx.retrain_root / "none-0")])[0]
        return results
    return evaluate(ctx.run, ctx.run.lam)


def _row(ctx: Context, method: str, fraction: float, units: list[Unit], metrics: dict, selection_seconds: float,
         update_seconds: float) -> dict:
    ids = [u.id for u in units]
    return {"method": method, "unit": ctx.cfg.unit, "fraction": fraction, "update": ctx.cfg.update,
            "seed": ctx.cfg.seed, "test_acc": float(metrics["test_acc"]),
            "test_acc_ci95": float(metrics["test_acc_ci95"]), "test_loss": float(metrics["test_loss"]),
            "selection_seconds": float(selection_seconds), "retrain_seconds": float(update_seconds),
            "removed_corrupted_fraction": removed_corrupted_fraction(units, ctx.flags), "num_removed": len(units),
            "num_removed_corrupted": int(ctx.flags.loc[ids].sum()) if ids else 0,
            "train_seed": ctx.run.train_cfg.seed}


# ---------------------------------------------------------------------------------- leave-one-out


def loo_protocol(ctx: Context) -> dict:
    """Leave-one-out retraining of ``num_units`` seeded units against task/instance-IF."""
    cfg = ctx.cfg
    units = sample_units(ctx.units, cfg.num_units, cfg.seed)
    ranking = gather_rankings(ctx, ["if"])["if"]
    pred = ranking.table.set_index("unit_id")["score"]
    editor = IFEditor(ctx.run, cfg.score)
    variants = seed_variants(ctx.run.train_cfg, cfg.retrain_seeds, cfg.seed, "batch_order")
    tables, seconds = [], {}
    for mode in cfg.loo_modes:
        retrains: LooRetrains = run_loo(ctx.run, cfg.score, units, mode, ctx.retrain_root, cfg.warm_steps,
                                        ctx.launch, ctx.f, variants=variants)
        tables.append(loo_table(retrains, pred, editor))
        seconds[mode] = retrains.seconds
    table = pd.concat(tables, ignore_index=True)
    extra = {"run": str(ctx.run.run_dir), "protocol": "loo", "unit": cfg.unit, "num_units": len(units),
             "seed": cfg.seed, "warm_steps": cfg.warm_steps, "retrain_seconds": seconds,
             "if_seconds": ranking.seconds, "damping": editor.curvature.damping}
    if cfg.retrain_seeds > 1:
        extra.update(retrain_seeds=cfg.retrain_seeds, seed_variants=[v.as_dict() for v in variants])
    summary = report.write_loo_outputs(ctx.out_dir, table, extra)
    for mode, s in summary["modes"].items():
        log.info("leave-one-out (%s, %d units): Pearson %.3f, Spearman %.3f, sign agreement %.2f, cos(delta_lam) "
                 "median %.3f", mode, s["n"], s["pearson"], s["spearman"], s["sign_agreement"],
                 s["cos_delta_lam_median"])
    return {**summary, "results": table}

