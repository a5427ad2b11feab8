"""Issue 12, in process: ``model=custom`` (norm conversion, refusals), state dicts, the image folder.

- a user network with ``nn.BatchNorm2d`` gives meta-Hessian-vector products that match central
  finite differences after conversion to metaif's primitive batch norm, and fails the same
  check unconverted (so the conversion is what fixes it);
- a missing or broken factory, a refused layer, a wrong head: one :class:`MetaifError` naming it;
- state dicts: ``module.`` prefix removed, a mismatch refused with missing and unexpected keys;
- the image folder: sorted stable ids, grey/RGB, fixed split folders, and each bad input named.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import own_helpers as H  # noqa: E402

from metaif_cli.meta.config import MetaConfig
from metaif_cli.models.config import ModelConfig  # noqa: E402
from metaif_cli.data.folder import list_folder, load_folder  # noqa: E402
from metaif_cli.errors import MetaifError  # noqa: E402
from metaif_cli.importer.weights import fit_builtin, fit_custom, read_state_dict  # noqa: E402
from metaif_cli.meta.learner import MetaLearner  # noqa: E402
from metaif_cli.meta.params import FlatSpec  # noqa: E402
from metaif_cli.models.networks import BatchNormPrimitive, build_model  # noqa: E402
from metaif_cli.models.custom import CustomMetaModel, build_custom, build_user_net  # noqa: E402

HELPERS = str(Path(H.__file__).resolve())


def _cfg(fn: str = "make_bn_net", head: str = "9", **kwargs) -> ModelConfig:
    return ModelConfig(name="custom", factory=f"{HELPERS}:{fn}", kwargs=kwargs or None, head=head)


def _flat(p: dict) -> Tensor:
    return FlatSpec.of(p).flatten(p)


def _meta_hvp_error(model: nn.Module, seed: int = 0, eps: float = 1e-6) -> float:
    """Relative error of forward-over-reverse ``H v`` against central differences of ``D_lam L_Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    x_spt, x_qry = torch.randn(6, 1, 8, 8, generator=g), torch.randn(9, 1, 8, 8, generator=g)  # [S|Q, C, H, W]
    y_spt, y_qry = torch.arange(3).repeat_interleave(2), torch.arange(3).repeat_interleave(3)
    u, v = 0.5 + torch.rand(6, generator=g), 0.5 + torch.rand(9, generator=g)
    learner = MetaLearner(model, MetaConfig(name="maml", inner_steps=2, inner_lr=0.5))
    lam = {k: p.detach().clone() for k, p in model.named_parameters()}
    d = {k: torch.randn(t.shape, generator=g) for k, t in lam.items()}
    norm = torch.linalg.norm(_flat(d))
    d = {k: t / norm for k, t in d.items()}

    def meta_grad(p):
        return grad(learner.task_loss)(p, x_spt, y_spt, u, x_qry, y_qry, v)

    _, hv = jvp(meta_grad, (lam,), (d,))
    gp = meta_grad({k: lam[k] + eps * d[k] for k in lam})
    gm = meta_grad({k: lam[k] - eps * d[k] for k in lam})
    fd = {k: (gp[k] - gm[k]) / (2 * eps) for k in lam}
    return float(torch.linalg.norm(_flat(hv) - _flat(fd)) / torch.linalg.norm(_flat(fd)))


def _unconverted(seed: int = 0) -> CustomMetaModel:
    """The same user network, split at its head but with nn.BatchNorm2d kept (batch statistics)."""
    net = build_user_net(f"{HELPERS}:make_bn_net", {}, seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    head = net[9]
    net[9] = nn.Identity()
    return CustomMetaModel(net, head)


def test_batchnorm_conversion_fixes_the_meta_hvp(float64):
    converted = build_custom(f"{HELPERS}:make_bn_net", {}, "9", (1, 8, 8), 3, seed=0).double()
    assert sum(isinstance(m, BatchNormPrimitive) for m in converted.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    plain = _unconverted().double()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(converted(x), plain(x))  # the same function and parameters
    assert [n for n, _ in converted.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert _meta_hvp_error(converted) < 1e-5
    err = _meta_hvp_error(plain)
    assert err > 1e-2, f"nn.BatchNorm2d now passes the finite-difference check (error {err:.1e})"


def test_custom_parameters_are_body_and_head_and_seeded():
    a = build_model(_cfg("make_named_net", head="fc"), (1, 8, 8), 3, seed=0)
    b = build_model(_cfg("make_named_net", head="fc"), (1, 8, 8), 3, seed=0)
    names = [n for n, _ in a.named_parameters()]
    assert names == ["body.features.0.weight", "body.features.0.bias", "body.features.1.weight",
                     "body.features.1.bias", "head.weight", "head.bias"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(("factory", "head", "fragment"), [
    ("no_such_module_xyz:make", "fc", "importing no_such_module_xyz failed"),
    (f"{HELPERS}:no_such_function", "fc", "has no callable 'no_such_function'"),
    (f"{HELPERS}:make_broken_net", "fc", "raised ValueError: this factory is broken on purpose"),
    ("not-a-path", "fc", "package.module:make_net"),
    (f"{HELPERS}:make_layernorm_net", "4", "layer '2' (LayerNorm)"),
    (f"{HELPERS}:make_named_net", "features.0", "is a Conv2d; it must be the final nn.Linear"),
    (f"{HELPERS}:make_named_net", "head", "not a layer of the network; its nn.Linear layers are: fc"),
])
def test_bad_factory_is_one_error_naming_it(factory, head, fragment):
    with pytest.raises(MetaifError, match=None) as info:
        build_model(ModelConfig(name="custom", factory=factory, head=head), (1, 8, 8), 3, seed=0)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_head_that_is_not_last_is_refused():
    class Scaled(H.NamedNet):
        def forward(self, x):
            return 2 * super().forward(x)

    from metaif_cli.models.custom import wrap_user_net

    with pytest.raises(MetaifError, match="not the last operation"):
        wrap_user_net(Scaled(), "fc", (1, 8, 8), 3)


def test_state_dicts_prefix_and_mismatch(tmp_path):
    model = build_model(ModelConfig(name="mlp", hidden=4), (1, 8, 8), 3, seed=0)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "l2l.pt")
    lam = fit_builtin(model, read_state_dict(tmp_path / "l2l.pt"))
    assert all(torch.equal(lam[k], p) for k, p in model.named_parameters())
    bad = {**{k: v for k, v in model.state_dict().items() if k != "head.bias"}, "extra.weight": torch.ones(1)}
    with pytest.raises(MetaifError) as info:
        fit_builtin(model, bad)
    assert "missing keys: head.bias" in str(info.value) and "unexpected keys: extra.weight" in str(info.value)
    torch.save(model, tmp_path / "pickled_module.pt")  # not loadable with weights_only=True
    with pytest.raises(MetaifError, match="weights_only=True"):
        read_state_dict(tmp_path / "pickled_module.pt")


def test_custom_state_dict_maps_user_names_and_copies_norm_state():
    net = H.make_named_net()
    with torch.no_grad():
        net.features[1].weight.uniform_(0.5, 2.0)
    sd = {k: v for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    lam = fit_custom(_cfg("make_named_net", head="fc"), sd, (1, 8, 8), 3, seed=1)
    assert torch.equal(lam["body.features.1.weight"], net.features[1].weight)
    assert torch.equal(lam["head.weight"], net.fc.weight)
    with pytest.raises(MetaifError, match="missing keys: fc.bias"):
        fit_custom(_cfg("make_named_net", head="fc"), {k: v for k, v in sd.items() if k != "fc.bias"}, (1, 8, 8),
                   3, seed=1)


# ------------------------------------------------------------------ the image folder


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, shared_data) -> Path:
    return H.write_digit_folder(tmp_path_factory.mktemp("digits") / "imgs", classes=4, per_class=5)


def test_folder_loads_grey_and_rgb_with_stable_ids(digit_folder):
    grey = load_folder(digit_folder, image_size=12, channels=1, min_per_class=5)
    rgb = load_folder(digit_folder, image_size=12, channels=3, min_per_class=5)
    assert grey.images.shape == (20, 1, 12, 12) and rgb.images.shape == (20, 3, 12, 12)
    assert grey.class_names == ["digit0", "digit1", "digit2", "digit3"] and grey.splits is None
    assert grey.labels.tolist() == [c for c in range(4) for _ in range(5)]
    assert 0.0 <= float(grey.images.min()) and float(grey.images.max()) <= 1.0 and grey.images.std() > 0.1
    assert torch.equal(load_folder(digit_folder, image_size=12, channels=1).images, grey.images)


def test_folder_split_subfolders_fix_the_class_split(tmp_path, digit_folder):
    import shutil

    for split, classes in (("train", [0, 1]), ("val", [2]), ("test", [3])):
        for c in classes:
            shutil.copytree(digit_folder / f"digit{c}", tmp_path / split / f"digit{c}")
    names, _, splits = list_folder(tmp_path)
    assert names == ["train/digit0", "train/digit1", "val/digit2", "test/digit3"]
    assert splits == {"train": [0, 1], "val": [2], "test": [3]}
    from metaif_cli.data.config import DatasetConfig
    from metaif_cli.data.pool import split_classes

    fixed = load_folder(tmp_path, image_size=8, channels=1)
    available = split_classes(fixed, DatasetConfig(name="folder"), torch.Generator().manual_seed(0))
    assert set(fixed.labels[available["val"]].tolist()) == {2}
    with pytest.raises(MetaifError, match="use dataset.split_by=class"):
        split_classes(fixed, DatasetConfig(name="folder", split_by="instance"), torch.Generator())
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(MetaifError, match="no val"):
        list_folder(tmp_path)


def test_folder_bad_inputs_name_the_file_or_class(tmp_path, digit_folder):
    import shutil

    with pytest.raises(MetaifError, match="holds no class subfolders|holds no PNG"):
        (tmp_path / "empty").mkdir()
        load_folder(tmp_path / "empty", image_size=8, channels=1)
    shutil.copytree(digit_folder, tmp_path / "d")
    for f in sorted((tmp_path / "d" / "digit2").iterdir())[:2]:
        f.unlink()
    with pytest.raises(MetaifError, match=r"class 'digit2' .* has 3 images, fewer than shots\+queries=5"):
        load_folder(tmp_path / "d", image_size=8, channels=1, min_per_class=5)
    bad = tmp_path / "d" / "digit1" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(MetaifError, match="corrupt or unreadable: .*broken.png"):
        load_folder(tmp_path / "d", image_size=8, channels=1)


def test_anil_adapts_only_the_custom_head(float64):
    model = build_model(_cfg("make_named_net", head="fc"), (1, 8, 8), 3, seed=0).double()
    learner = MetaLearner(model, MetaConfig(name="anil", inner_steps=2, inner_lr=0.5))
    lam = {k: p.detach().clone() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(2)
    phi = learner.adapt(lam, x, y, torch.ones(6))
    changed = sorted(k for k in lam if not torch.equal(lam[k], phi[k]))
    assert changed == ["head.bias", "head.weight"]


def test_save_image_folder_round_trip(tmp_path):
    from metaif_cli import api

    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 8, 8, generator=g)  # [N, C, H, W]
    labels = torch.tensor([0, 1, 2] * 4)
    api.save_image_folder(images, labels, tmp_path / "f", class_names=["a", "b", "c"])
    back = load_folder(tmp_path / "f", image_size=8, channels=3)
    order = labels.argsort(stable=True)  # the folder lists class by class, rows in order within a class
    assert back.class_names == ["a", "b", "c"] and torch.equal(back.labels, labels[order])
    assert float((back.images - images[order]).abs().max()) <= 0.5 / 255 + 1e-6
