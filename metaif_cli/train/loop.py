"""The meta-training loop: seeded meta-batches, checkpoints, resume (method §1).

Minimises ``F(lam; w, u, v) = (1/n) sum_k w_k L_Q^k + (delta_reg/2)||lam||^2`` with
meta-batches drawn from a seeded generator. The same function trains the original
model and every retraining of ``prune-and-retrain``: removed units have weight 0 and
the batch order is unchanged. An interrupted run resumes from ``checkpoint_last.pt``
and ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import metaif_cli
from metaif_cli import constants as C
from metaif_cli.errors import MetaifError
from metaif_cli.train.experiment import Experiment, config_dict
from metaif_cli.io import (clean_stale_temporaries, load_json, load_torch, read_csv, save_csv, save_json,
                          save_torch)
from metaif_cli.meta.params import Params, non_finite
from metaif_cli.progress import bar as progress_bar
from metaif_cli.reports.intervals import mean_ci95
from metaif_cli.train.finished import require_finite_run
from metaif_cli.train.loggers import make_logger

log = logging.getLogger(__name__)


@dataclass
class PoolWeights:
    """Weights of the training pool: ``w [n]``, ``u [n,S]``, ``v [n,Q]`` (method §1)."""

    w: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @classmethod
    def ones(cls, n: int, s: int, q: int) -> "PoolWeights":
        return cls(torch.ones(n), torch.ones(n, s), torch.ones(n, q))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"w": self.w, "u": self.u, "v": self.v}


def checkpoint_steps(steps: int, num: int) -> list[int]:
    """Steps at which intermediate checkpoints are kept (evenly spaced, last = final); at most one per
    step (``num > steps`` keeps every step, without counting to ``num``)."""
    num = min(num, steps)
    return sorted({max(1, round(steps * i / num)) for i in range(1, num + 1)}) if num else []


def batch_generator(cfg) -> torch.Generator:
    """The seeded generator whose draws are the meta-batch order (replayed by ``method=trajectory``)."""
    return torch.Generator().manual_seed(cfg.batch_seed + 1)


def draw_batch(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Task indices of the next meta-batch."""
    return torch.randperm(n, generator=gen)[:size]


def batch_schedule(cfg, n: int, steps: int) -> list[torch.Tensor]:
    """The task indices of every step's meta-batch of a run trained from scratch."""
    gen = batch_generator(cfg)
    return [draw_batch(gen, n, cfg.optim.meta_batch_size) for _ in range(steps)]


def make_optimizer(params: list[torch.Tensor], exp: Experiment) -> torch.optim.Optimizer:
    o = exp.cfg.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr)
    return torch.optim.SGD(params, lr=o.lr)


def evaluate_split(exp: Experiment, lam: Params, split: str) -> dict[str, float]:
    """Mean query loss and accuracy (with 95% intervals) over a split's tasks after adaptation."""
    batch = exp.tasks(split)  # gathered chunk by chunk inside evaluate
    losses, accs = exp.learner.evaluate(lam, batch, chunk=exp.eval_chunk)
    acc, acc_ci = mean_ci95(accs.double().cpu().numpy())
    loss, loss_ci = mean_ci95(losses.double().cpu().numpy())
    if not (math.isfinite(loss) and math.isfinite(acc)):
        raise MetaifError(f"the {split} loss is {loss}: the parameters diverged or overflow in {exp.dtype} "
                          f"(optim.lr={exp.cfg.optim.lr}, meta.inner_lr={exp.cfg.meta.inner_lr}); lower optim.lr "
                          "or meta.inner_lr, or check the weights")
    return {f"{split}_acc": acc, f"{split}_acc_ci95": acc_ci, f"{split}_loss": loss, f"{split}_loss_ci95": loss_ci}


def init_digest(init_lam: Params | None) -> str | None:
    """A fingerprint of a warm start (``None``: the seeded initialisation)."""
    if init_lam is None:
        return None
    h = hashlib.sha1()
    for k in sorted(init_lam):
        h.update(k.encode())
        h.update(init_lam[k].detach().cpu().double().numpy().tobytes())
    return h.hexdigest()


def train_state(step, lam, opt, gen, metrics, elapsed, exp, weights, setup) -> dict:
    return {"format_version": C.FORMAT_VERSION, "config": config_dict(exp.cfg), "step": step, "setup": setup,
            "lam": {k: v.detach().cpu() for k, v in lam.items()}, "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "metrics": metrics, "elapsed": elapsed,
            "weights": weights.as_dict(),
            "model_args": {"image_shape": list(exp.dataset.image_shape), "ways": exp.cfg.dataset.ways}}


def _same_setup(saved: dict, exp: Experiment, weights: PoolWeights, setup: dict) -> bool:
    """Same config (but for display and device), same weights, same steps and start."""
    from metaif_cli.train.preflight import comparable  # display options ignored, paths resolved

    a, b = comparable(saved["config"]), comparable(config_dict(exp.cfg))
    return (a == b and saved.get("setup") == setup
            and all(torch.equal(saved["weights"][k], t) for k, t in weights.as_dict().items()))


RETRAIN_FIX = "rerun the same metaif train command to rewrite it"


def finished_run_results(run_dir: Path, exp: Experiment, weights: PoolWeights, setup: dict) -> dict | None:
    """``results.json`` when ``run_dir`` holds this very run, finished and intact; else None.

    A damaged or missing ``model.pt``, ``results.json`` or ``metrics.csv`` makes the run
    unfinished: it is completed again from its last checkpoint.
    """
    paths = [run_dir / n for n in (C.RESULTS_JSON, C.MODEL_PT, C.METRICS_CSV)]
    if not all(p.exists() for p in paths):
        return None
    try:
        model = load_torch(run_dir / C.MODEL_PT, RETRAIN_FIX, keys=("config", "lam", "weights"))
        results = load_json(run_dir / C.RESULTS_JSON, RETRAIN_FIX, keys=("test_acc",))
        read_csv(run_dir / C.METRICS_CSV, RETRAIN_FIX, columns=("step", "train_loss"), rows=setup["steps"])
    except MetaifError as exc:
        log.warning("%s; completing the run again from its last checkpoint", exc)
        return None
    require_finite_run(run_dir, model, results)
    return results if _same_setup(model, exp, weights, setup) else None


def resume_state(run_dir: Path, exp: Experiment, weights: PoolWeights, setup: dict) -> dict | None:
    """The newest intact checkpoint of this run (``checkpoint_last.pt``, else ``checkpoint_prev.pt``).

    A damaged checkpoint is skipped with a warning (and removed, so it is not kept as the
    previous one); when every checkpoint present is damaged, training cannot resume and
    one line says so. Returns None for a fresh run.
    """
    present = [p for p in (run_dir / C.CHECKPOINT_LAST, run_dir / C.CHECKPOINT_PREV) if p.exists()]
    damaged = []
    for path in present:
        try:
            saved = load_torch(path, RETRAIN_FIX, keys=("config", "step", "lam", "optimizer", "generator",
                                                          "metrics", "elapsed", "weights"))
        except MetaifError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
            damaged.append(path)
            continue
        if not _same_setup(saved, exp, weights, setup):
            raise MetaifError(f"{run_dir} holds a run with different settings; choose another hydra.run.dir "
                              "or delete that directory")
        for bad in damaged:
            bad.unlink()
        return saved
    if damaged:
        names = " and ".join(str(p) for p in damaged)
        raise MetaifError(f"cannot resume {run_dir}: {names} damaged and no earlier good checkpoint; "
                          f"delete {run_dir} and rerun the command to train from the start")
    return None


def train(exp: Experiment, run_dir: Path, weights: PoolWeights | None = None, init_lam: Params | None = None,
          steps: int | None = None) -> dict:
    """Meta-train (or resume) in ``run_dir``; return the ``results.json`` content.

    Args:
        exp: the experiment (data, pools, learner).
        run_dir: where checkpoints, ``metrics.csv`` and ``results.json`` go.
        weights: pool weights (removal = 0); unit weights by default.
        init_lam: start here instead of the seeded initialisation (warm retraining).
        steps: number of outer steps (default ``optim.steps``).
    """
    cfg, o = exp.cfg, exp.cfg.optim
    run_dir.mkdir(parents=True, exist_ok=True)
    pool = exp.pools["train"]
    n, s, q = len(pool), pool.spt_idx.shape[1], pool.qry_idx.shape[1]
    weights = weights or PoolWeights.ones(n, s, q)
    steps = steps or o.steps
    last_path = run_dir / C.CHECKPOINT_LAST
    prev_path = run_dir / C.CHECKPOINT_PREV
    setup = {"steps": steps, "init": init_digest(init_lam)}
    clean_stale_temporaries(run_dir)
    finished = finished_run_results(run_dir, exp, weights, setup)
    if finished is not None:
        log.info("run in %s is complete; nothing to do", run_dir)
        return finished
    lam = {k: v.clone() for k, v in (init_lam or exp.initial_params()).items()}
    leaves = [t.requires_grad_(False) for t in lam.values()]
    opt = make_optimizer(leaves, exp)
    gen = batch_generator(cfg)
    start, metrics, elapsed = 0, [], 0.0
    saved = resume_state(run_dir, exp, weights, setup)
    if saved is not None:
        for k in lam:
            lam[k].copy_(saved["lam"][k].to(lam[k]))
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        start, metrics, elapsed = saved["step"], saved["metrics"], saved["elapsed"]
        log.info("resuming %s from step %d", run_dir, start)
    keep = set(checkpoint_steps(steps, o.num_checkpoints))
    tasks = exp.tasks("train", weights={"w": weights.w, "u": weights.u, "v": weights.v})
    logger = make_logger(cfg.logger, run_dir, start)
    bar = progress_bar(range(start, steps), initial=start, total=steps, desc=f"meta-train {run_dir.name}",
                       enabled=cfg.progress)  # the name tells retrainings apart (e.g. if-0.2-b7) in a log
    t0 = time.perf_counter()
    for step in bar:
        idx = draw_batch(gen, n, o.meta_batch_size)
        batch = tasks[idx]  # images of this meta-batch only, with its weights
        grads, losses = exp.learner.meta_gradient(lam, batch)
        loss = float((batch.w * losses).sum() / len(batch))
        if not math.isfinite(loss):
            raise MetaifError(f"training diverged: loss is {loss} at step {step + 1}; lower optim.lr or meta.inner_lr")
        for k, t in lam.items():
            t.grad = grads[k] + o.delta_reg * t
        try:
            opt.step()
        except RuntimeError as exc:  # Adam's step size overflows the parameters' dtype
            if "overflow" not in str(exc):
                raise
            raise MetaifError(f"training diverged: the step of optim.lr={o.lr} overflows {exp.dtype} at step "
                              f"{step + 1}; lower optim.lr") from None
        done = step + 1
        bad = non_finite(lam)
        if bad:
            raise MetaifError(f"training diverged: parameter {bad[0]} is not finite after step {done} "
                              f"(optim.lr={o.lr}); lower optim.lr or meta.inner_lr")
        row = {"step": done, "train_loss": loss}
        if done % o.eval_every == 0 or done == steps:
            row.update({k: v_ for k, v_ in evaluate_split(exp, lam, "val").items() if "ci95" not in k})
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{row['val_acc']:.3f}")
        else:
            bar.set_postfix(loss=f"{loss:.3f}")
        metrics.append(row)
        logger.log(done, {**row, "lr": opt.param_groups[0]["lr"]})
        if done in keep:
            # the optimiser state lets method=trajectory replay the run segment by segment
            save_torch({"step": done, "lam": {k: t.detach().cpu() for k, t in lam.items()},
                        "lr": opt.param_groups[0]["lr"], "optimizer": opt.state_dict()},
                       run_dir / C.CHECKPOINT_DIR / f"step_{done:06d}.pt")
        if done % o.checkpoint_every == 0 or done == steps:
            now = elapsed + time.perf_counter() - t0
            # the previous good state is kept as checkpoint_prev.pt, should this one be damaged
            save_torch(train_state(done, lam, opt, gen, metrics, now, exp, weights, setup), last_path, prev_path)
            save_csv(pd.DataFrame(metrics), run_dir / C.METRICS_CSV)
    elapsed += time.perf_counter() - t0
    bar.close()
    logger.close()
    return finish(exp, run_dir, lam, elapsed, steps, weights, setup, metrics)


def finish(exp: Experiment, run_dir: Path, lam: Params, elapsed: float, steps: int, weights: PoolWeights,
           setup: dict, metrics: list[dict], test: dict[str, float] | None = None) -> dict:
    """Evaluate on the meta-test pool and write ``metrics.csv``, ``model.pt`` and ``results.json``.

    ``metrics.csv`` is written again here: a run killed between its last checkpoint and
    its ``metrics.csv`` resumes at the final step, and must still end with every row.
    ``test``: the meta-test metrics when already computed (a batch of retrainings evaluates them at once).
    """
    save_csv(pd.DataFrame(metrics), run_dir / C.METRICS_CSV)
    test = test if test is not None else evaluate_split(exp, lam, "test")
    save_torch({"format_version": C.FORMAT_VERSION, "config": config_dict(exp.cfg), "setup": setup,
                "lam": {k: v.detach().cpu() for k, v in lam.items()}, "weights": weights.as_dict(),
                "model_args": {"image_shape": list(exp.dataset.image_shape), "ways": exp.cfg.dataset.ways}},
               run_dir / C.MODEL_PT)
    last_val = next((r for r in reversed(metrics) if "val_acc" in r), {})  # evaluated at the final step
    val = {k: float(last_val[k]) for k in ("val_acc", "val_loss") if k in last_val}
    seeds = {k: v for k, v in (("batch_seed", exp.cfg.optim.batch_seed), ("init_seed", exp.cfg.model.init_seed))
             if v is not None}  # only when set: default runs write what they always wrote
    results = {**test, **val, "train_seconds": elapsed, "steps": steps, "seed": exp.cfg.seed, **seeds,
               "device": str(exp.device), "dtype": str(exp.dtype).replace("torch.", ""),
               "versions": {"metaif": metaif_cli.__version__, "torch": torch.__version__,
                            "python": platform.python_version()}}
    save_json(results, run_dir / C.RESULTS_JSON)
    log.info("meta-test accuracy %.4f +- %.4f (loss %.4f) after %.1f s (%s)", test["test_acc"], test["test_acc_ci95"],
             test["test_loss"], elapsed, run_dir.name)
    return results
