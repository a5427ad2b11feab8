"""Score your own meta-learner: your images, your network, your training loop (docs/reference.md "Your own data and model").

What a user does, start to end:

1. writes an image folder (here: real MNIST test digits from ``../shared/data``, as PNG files in
   ``<out>/digits/<class>/``; with your own data, point ``dataset.path`` at your folder);
2. defines a small network with batch norm in plain PyTorch (:func:`make_net`);
3. meta-trains it with MAML in a training loop of their own (``torch.func.functional_call`` and
   ``torch.autograd.grad``, no metaif code) on the tasks ``metaif_cli.api.build_task_pools`` draws,
   some of them corrupted on purpose (query labels shifted, as in the paper's harmful-task experiment);
4. saves the weights the way learn2learn's ``MAML`` wrapper does (``module.`` prefix), imports them
   (``api.import_weights``, the same as ``metaif import``), scores every training task
   (``api.score``, the same as ``metaif score``) and prints the most harmful tasks.

    python scripts/example_own_model.py --out /tmp/own_example     # about two minutes on a CPU
    python scripts/example_own_model.py --out /tmp/x --steps 3 --tasks 10 --per-class 20 --queries 3  # CI

Afterwards the CLI works on the same run: ``metaif score run=<out>/run factory=<this file>:make_net``,
``metaif prune-and-retrain run=<out>/run score.factory=<this file>:make_net`` (it retrains with the
settings given to the import; a run names its factory for checking only, you give it).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------- 1. an image folder


def write_mnist_folder(root: Path, data: Path, per_class: int) -> Path:
    """``root/<digit>/<index>.png`` from the real MNIST test digits (IDX files in ``data/MNIST/raw``)."""
    from PIL import Image
    from torchvision.datasets.mnist import read_image_file, read_label_file

    tmp = Path(tempfile.mkdtemp())
    try:
        files = {}
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            with gzip.open(data / "MNIST" / "raw" / f"{name}.gz") as f:
                (tmp / name).write_bytes(f.read())
            files[name] = tmp / name
        images = read_image_file(str(files["t10k-images-idx3-ubyte"]))  # [N, 28, 28] uint8
        labels = read_label_file(str(files["t10k-labels-idx1-ubyte"]))  # [N]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for digit in range(10):
        folder = root / ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][digit]
        folder.mkdir(parents=True, exist_ok=True)
        for i in torch.nonzero(labels == digit).flatten()[:per_class].tolist():
            Image.fromarray(images[i].numpy()).save(folder / f"{i:05d}.png")
    return root


# ---------------------------------------------------------------------------- 2. a network


class SmallNet(nn.Module):
    """conv-BatchNorm-ReLU-pool twice, then the classifier ``fc`` (``[B, 1, 28, 28] -> [B, ways]``)."""

    def __init__(self, ways: int = 5, hidden: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.fc = nn.Linear(hidden * 7 * 7, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_net(ways: int = 5, hidden: int = 16) -> SmallNet:
    """The factory metaif calls (``model.factory=<this file>:make_net``)."""
    return SmallNet(ways, hidden)


# ---------------------------------------------------------------------------- 3. my own MAML loop


def maml_train(net: nn.Module, batch, steps: int, meta_batch: int, inner_steps: int, inner_lr: float, lr: float,
               seed: int) -> list[float]:
    """Second-order MAML on the tasks of ``batch`` (x_spt [T, S, 1, 28, 28], y_spt [T, S], ...)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        idx = torch.randperm(batch.x_spt.shape[0], generator=gen)[:meta_batch]
        total = 0.0
        for k in idx.tolist():
            params = dict(net.named_parameters())
            for _ in range(inner_steps):
                loss = F.cross_entropy(functional_call(net, params, (batch.x_spt[k],)), batch.y_spt[k])
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {n: p - inner_lr * g for (n, p), g in zip(params.items(), grads)}
            query_loss = F.cross_entropy(functional_call(net, params, (batch.x_qry[k],)), batch.y_qry[k])
            (query_loss / len(idx)).backward()
            total += query_loss.item() / len(idx)
        opt.step()
        losses.append(total)
    return losses


# ---------------------------------------------------------------------------- 4. import, score, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for images, weights, run and scores")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder holding MNIST/raw/t10k-*.gz")
    parser.add_argument("--per-class", type=int, default=30, help="images per digit written to the folder")
    parser.add_argument("--tasks", type=int, default=40, help="training tasks")
    parser.add_argument("--steps", type=int, default=100, help="outer steps of my training loop")
    parser.add_argument("--queries", type=int, default=5, help="query images per class in a task")
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--top", type=int, default=5, help="harmful tasks to print")
    args = parser.parse_args(argv)

    from metaif_cli import api  # metaif appears only from here on

    torch.manual_seed(0)
    folder = write_mnist_folder(args.out / "digits", args.data, args.per_class)
    ways, inner_steps, inner_lr, lr, meta_batch = 5, 1, 0.4, 3e-3, 4
    cfg = api.TrainConfig(
        seed=0, progress=False,
        # ten digits only: train/val/test tasks use disjoint images of the same classes, as metaif's MNIST does
        dataset=api.DatasetConfig(name="folder", path=str(folder), image_size=28, channels=1, ways=ways, shots=1,
                                  queries=args.queries, num_train_tasks=args.tasks, num_val_tasks=5,
                                  num_test_tasks=10, split_by="instance", split_fractions=[0.5, 0.2, 0.3]),
        corruption=api.CorruptionConfig(task_fraction=0.2, task_mode="shift"),  # some harmful tasks, on purpose
        model=api.ModelConfig(name="custom", factory=f"{Path(__file__).resolve()}:make_net",
                              kwargs={"ways": ways, "hidden": args.hidden}, head="fc"),
        meta=api.MetaConfig(name="maml", inner_steps=inner_steps, inner_lr=inner_lr),
        optim=api.OptimConfig(steps=args.steps, lr=lr, meta_batch_size=meta_batch, eval_every=args.steps,
                              checkpoint_every=args.steps, num_checkpoints=1))
    pools = api.build_task_pools(cfg.dataset, seed=cfg.seed, corruption=cfg.corruption)
    net = make_net(ways, args.hidden)
    losses = maml_train(net, pools.batch("train"), args.steps, meta_batch, inner_steps, inner_lr, lr, seed=0)
    print(f"my training loop: query loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")

    weights = args.out / "maml_weights.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, weights)  # as learn2learn's MAML saves
    results = api.import_weights(args.out / "run", weights, cfg)
    print(f"imported: meta-test accuracy {results['test_acc']:.3f} +- {results['test_acc_ci95']:.3f}")

    scores = api.score(args.out / "run", args.out / "scores", unit="task", hessian={"num_tasks": 16},
                       evaluation={"num_tasks": 10}, factory=cfg.model.factory)
    top = scores.task_scores.sort_values("rank").head(args.top)
    print(f"the {args.top} most harmful training tasks (negative = removing it lowers the meta-test loss):")
    print(top.to_string(index=False))
    found = int(top.corrupted.sum())
    print(f"{found} of them are corrupted ({int(scores.task_scores.corrupted.sum())} of {len(scores.task_scores)} "
          f"tasks are); scores in {args.out / 'scores'}")


if __name__ == "__main__":
    main()
