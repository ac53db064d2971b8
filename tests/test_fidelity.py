"""Reference modes: the numbers of the public reference code, pinned (see docs/fidelity.md)."""

from __future__ import annotations

import math
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from sparsetrain import SparsityCallback
from sparsetrain.core.budgets import layer_densities
from sparsetrain.core.imp import imp_masks
from sparsetrain.core.regrowth import drop_count
from sparsetrain.methods import GraNet, RigL, SparsityContext
from tests.helpers import TinyNet, random_loader, trainer
from tests.test_lottery import lottery


# ----------------------------------------------------------------------------- RigL
def test_rigl_drop_fraction_paper_curve_and_default():
    paper, ours = RigL(every=100, end=1000, drop_fraction_schedule="cosine_paper"), RigL(every=100, end=1000)
    for m in (paper, ours):
        m.setup(2000)
    assert [round(paper.drop_fraction_at(t), 4) for t in (100, 300)] == [0.2927, 0.2382]
    assert paper.drop_fraction_at(900) == pytest.approx(0.00734, abs=5e-6)
    assert [round(ours.drop_fraction_at(t), 4) for t in (100, 300)] == [0.3, 0.2649]
    assert ours.drop_fraction_at(900) == pytest.approx(0.00905, abs=5e-6)
    assert paper.drop_fraction_at(1000) == ours.drop_fraction_at(1000) == 0.0  # the update at end is a no-op


def test_rigl_skip_optimizer_step_leaves_the_update_batch_untrained():
    L.seed_everything(0)
    model = TinyNet()
    cb = SparsityCallback(RigL(sparsity=0.8, every=4, end=12, skip_optimizer_step=True))
    biases = {}

    class Biases(Callback):  # biases are no targets: only the optimizer moves them
        def on_train_batch_end(self, trainer, pl_module, *args):
            biases[trainer.global_step] = pl_module.fc1.bias.detach().clone()

    trainer(max_epochs=2, callbacks=[cb, Biases()]).fit(model, random_loader())
    for t in range(2, 17):
        skipped = t in (4, 8, 12)
        assert torch.equal(biases[t], biases[t - 1]) == skipped, t


# --------------------------------------------------------------------------- GraNet
def test_granet_regrowth_floor_matches_the_references_cosine_decay():
    m = GraNet(sparsity=0.9, start=0, end=500, every=100, regrowth_fraction=0.5, regrowth_end=1000, regrowth_floor=0.005)
    m.setup(1000)
    last = 900  # the last update before regrowth_end
    expected = 0.005 + (0.5 - 0.005) / 2 * (1 + math.cos(math.pi * last / 1000))  # CosineAnnealingLR(eta_min)
    assert m.regrowth_fraction_at(last) == pytest.approx(expected)
    assert drop_count(2800, m.regrowth_fraction_at(last), "ceil") == math.ceil(2800 * expected) == 48
    assert drop_count(2800, 0.005, "ceil") == 14  # what the floor alone regrows, where the default regrows 0
    no_floor = GraNet(sparsity=0.9, start=0, end=500, every=100, regrowth_end=1000)
    no_floor.setup(1000)
    assert no_floor.regrowth_fraction_at(1000) == m.regrowth_fraction_at(1000) == 0.0  # regrowth ends there


def test_granet_layerwise_prunes_the_same_fraction_of_every_layer():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(100, 50, generator=g), "b": torch.randn(400, 50, generator=g)}
    masks = {"a": torch.rand(100, 50, generator=g) < 0.8, "b": torch.rand(400, 50, generator=g) < 0.4}
    method = GraNet(sparsity=0.9, initial_density=0.5, start=0, end=10, every=1, regrowth_fraction=0.0, pruning="layerwise")
    method.setup(10)
    ctx = SparsityContext(params, masks, 10, g)
    new = method.update(ctx, 10, None)  # end: keep exactly 10 % of all weights
    kept = {n: int(m.sum()) for n, m in new.items()}
    assert sum(kept.values()) == round(0.1 * 25000)
    before = {n: int(m.sum()) for n, m in masks.items()}
    assert abs(kept["a"] / before["a"] - kept["b"] / before["b"]) < 2 / before["a"]  # same fraction, within rounding
    assert all(not (new[n] & ~masks[n]).any() for n in new)  # only pruned


# ------------------------------------------------------------------------------ ERK
def test_overrides_outside_the_budget_let_the_global_sparsity_drift_as_rigl_does():
    shapes = {"conv1.weight": (64, 3, 7, 7), "conv2.weight": (128, 64, 3, 3), "fc.weight": (1000, 128)}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    exact = layer_densities(shapes, 0.9, "erk", overrides={"conv1.weight": 0.0})
    outside = layer_densities(shapes, 0.9, "erk", overrides={"conv1.weight": 0.0}, overrides_mode="outside")
    total = sum(sizes.values())
    assert sum(exact[n] * sizes[n] for n in shapes) == pytest.approx(0.1 * total)  # global sparsity exact
    rest = total - sizes["conv1.weight"]
    assert outside["conv1.weight"] == 1.0
    assert sum(outside[n] * sizes[n] for n in shapes if n != "conv1.weight") == pytest.approx(0.1 * rest)
    drifted = 1 - sum(outside[n] * sizes[n] for n in shapes) / total
    assert drifted == pytest.approx(0.9 * rest / total) and drifted < 0.9


# -------------------------------------------------------------------------- OpenLTH
def lenet300(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"fc1": torch.randn(300, 784, generator=g), "fc2": torch.randn(100, 300, generator=g),
            "fc": torch.randn(10, 100, generator=g)}


def levels(weights, n, **kwargs):
    masks = None
    for level in range(1, n + 1):
        masks = imp_masks(weights, masks, level, 0.2, **kwargs)
    return masks


def test_openlth_level_20_with_the_output_layer_ignored():
    w = lenet300()
    openlth = levels(w, 20, ignore=["fc"], counting="openlth")
    assert int(openlth["fc1"].sum() + openlth["fc2"].sum()) == 2062  # 0.78 % of the 265,200 hidden weights
    assert bool(openlth["fc"].all())  # dense, but counted
    hidden_only = levels({n: w[n] for n in ("fc1", "fc2")}, 20)  # the output layer simply not a target
    assert int(hidden_only["fc1"].sum() + hidden_only["fc2"].sum()) == 3058  # 1.15 %
    closed = levels(w, 20, ignore=["fc"])
    assert int(closed["fc1"].sum() + closed["fc2"].sum()) == round(266200 * 0.8**20) - 1000 == 2069


def test_openlth_prunes_ceil_p_remaining_plus_one_per_level():
    w = lenet300(1)
    masks, remaining = None, 266200
    for level in range(1, 6):
        masks = imp_masks(w, masks, level, 0.2, counting="openlth")
        remaining -= math.ceil(0.2 * remaining) + 1
        assert sum(int(m.sum()) for m in masks.values()) == remaining
    closed = levels(w, 5)
    assert sum(int(m.sum()) for m in closed.values()) - remaining == 5  # the gap after 5 levels (at most 2 per level)


STATES: dict[str, int] = {}


class OptimizerStateAtStart(Callback):
    """Records how many optimizer state entries a level starts with."""

    def on_train_start(self, trainer, pl_module):
        STATES[trainer.default_root_dir] = sum(len(s) for s in trainer.optimizers[0].state.values())


def test_fresh_optimizer_per_level_as_openlth(tmp_path):
    probe = "+callbacks.state._target_=tests.test_fidelity.OptimizerStateAtStart"
    STATES.clear()
    lottery(tmp_path / "openlth", ["lottery.levels=1", "lottery.rewind_optimizer=false", probe]).run()
    assert [v for _, v in sorted(STATES.items())] == [0, 0]  # level 1 starts fresh after rewinding to k = 7
    STATES.clear()
    lottery(tmp_path / "default", ["lottery.levels=1", probe]).run()
    assert sorted(STATES.items())[1][1] > 0  # the default restores the rewind point's momentum


# ---------------------------------------------------------------------------- presets
PRESETS = [
    ("train", "rigl_resnet50_imagenet", ["drop_fraction_schedule: cosine_paper", "skip_optimizer_step: true", "lr: 1.6"]),
    ("train", "rigl_wrn22_cifar10", ["name: wrn22_2", "sparsity: 0.8", "end: 75000"]),
    ("train", "granet_resnet50_cifar", ["regrowth_floor: 0.005", "initial_density: 0.5", "every: 1000"]),
    ("lottery", "lth_lenet300_mnist", ["counting: openlth", "rewind_optimizer: false", "- net.net.5.weight"]),
    ("lottery", "lth_resnet20_cifar10", ["counting: openlth", "rewind: 500"]),
    ("lottery", "lth_vgg16_cifar10", ["counting: openlth", "- net.fc.weight"]),
]


@pytest.mark.parametrize("app, experiment, expect", PRESETS)
def test_reference_presets_compose_and_their_methods_construct(app, experiment, expect):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sparsetrain.apps.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(app, overrides=[f"experiment={experiment}"])
    text = OmegaConf.to_yaml(cfg)
    for line in expect:
        assert line in text, line
    if app == "train":  # the callback and its method validate every value at construction
        assert isinstance(instantiate(cfg.sparsity), SparsityCallback)


@pytest.mark.slow
@pytest.mark.parametrize("app, experiment, expect", PRESETS)
def test_reference_presets_cfg_job(app, experiment, expect):
    out = subprocess.run([sys.executable, "-m", f"sparsetrain.apps.{app}", f"experiment={experiment}", "--cfg", "job"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for line in expect:
        assert line in out.stdout, line
