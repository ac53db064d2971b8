"""The paths real users take, each with a real Trainer: exact sparsity, or a clear error at fit start."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core import layer_counts
from sparsetrain.core.regrowth import drop_and_grow
from sparsetrain.methods import GMP, GraNet, RigL, Static, StochasticAnnealing
from tests.helpers import TinyNet, random_loader, trainer

TARGETS = ["conv.weight", "fc1.weight", "fc2.weight"]


def zeros(module: nn.Module, names) -> dict[str, int]:
    """Zeros in the weights the model computes with."""
    return {n: int((module.get_parameter(n) == 0).sum()) for n in names}


def pruned(shapes: dict, sparsity: float, distribution: str = "uniform") -> dict[str, int]:
    kept = layer_counts(shapes, sparsity, distribution)
    return {n: math.prod(s) - kept[n] for n, s in shapes.items()}


def shapes_of(module: nn.Module, names) -> dict[str, tuple[int, ...]]:
    return {n: tuple(module.get_parameter(n).shape) for n in names}


class NoBatch(Callback):
    """Fails the test if a training batch starts: errors must come at fit start."""

    def on_train_batch_start(self, *args):
        raise AssertionError("a training batch ran before the configuration error")


# ------------------------------------------------------- 1. several optimizers
class GAN(L.LightningModule):
    """Manual optimization, two optimizers: a discriminator step, then a generator step, per batch."""

    GEN = ["gen.0.weight", "gen.2.weight"]
    DISC = ["disc.0.weight", "disc.2.weight"]

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))
        self.disc = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x = batch[0].flatten(1)
        z = x[:, :8]
        opt_gen, opt_disc = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        real, fake = self.disc(x), self.disc(self.gen(z).detach())
        loss_disc = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
        opt_disc.zero_grad()
        self.manual_backward(loss_disc)
        opt_disc.step()  # odd global steps
        fooled = self.disc(self.gen(z))
        opt_gen.zero_grad()
        self.manual_backward(bce(fooled, torch.ones_like(fooled)))
        opt_gen.step()  # even global steps

    def configure_optimizers(self):
        sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)  # noqa: E731
        return [sgd(self.gen), sgd(self.disc)]


class ZerosEveryStep(Callback):
    def __init__(self, names):
        self.names, self.by_step = names, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.by_step[trainer.global_step] = sum(zeros(pl_module, self.names).values())


def test_two_optimizers_gmp_lands_on_its_final_sparsity_at_an_odd_step():
    """GMP(end=15, every=5): updates at 5, 10, 15 fall on discriminator steps inside batches (2 steps each)."""
    L.seed_everything(0)
    model, names = GAN(), GAN.GEN + GAN.DISC
    cb = SparsityCallback(GMP(sparsity=0.9, start=0, end=15, every=5))
    rec = ZerosEveryStep(names)
    trainer(max_epochs=1, callbacks=[cb, rec]).fit(model, random_loader())
    assert trainer is not None and max(rec.by_step) == 16  # 8 batches, 2 optimizer steps each
    expected = pruned(shapes_of(model, names), 0.9)
    assert zeros(model, names) == expected  # was 86.7 % when step 15 went unseen
    assert rec.by_step[14] < sum(expected.values()) == rec.by_step[16]


def test_two_optimizers_fractions_resolve_against_optimizer_steps():
    L.seed_everything(0)
    model, names = GAN(), GAN.GEN + GAN.DISC
    cb = SparsityCallback(GMP(sparsity=0.8, start=0, end=0.75, every=2))
    rec = ZerosEveryStep(names)
    trainer(max_epochs=2, callbacks=[cb, rec]).fit(model, random_loader())  # 16 batches, 32 steps
    assert cb.method._steps.end == 24 and cb._total_steps == 32
    final = sum(pruned(shapes_of(model, names), 0.8).values())
    assert rec.by_step[22] < final and rec.by_step[24] == final == rec.by_step[32]


class CountingRigL(RigL):
    def update(self, ctx, step, grads):
        self.calls.append((step, sorted(grads), {n: grads[n].abs().sum().item() for n in grads}))
        return super().update(ctx, step, grads)


def test_two_optimizers_rigl_runs_every_update_with_that_optimizers_gradients():
    L.seed_everything(0)
    model = GAN()
    method = CountingRigL(sparsity=0.8, every=3, end=30, distribution="uniform")
    method.calls = []
    cb = SparsityCallback(method)
    masks = {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            masks[trainer.global_step] = {n: m.clone() for n, m in cb.masks.items()}

    trainer(max_epochs=2, callbacks=[cb, Grab()]).fit(model, random_loader())
    assert [c[0] for c in method.calls] == list(range(3, 31, 3))  # all 10 updates (5 before)
    for step, moved, sums in method.calls:
        assert moved == sorted(GAN.DISC if step % 2 else GAN.GEN)  # the stepping optimizer's layers only
        assert all(v > 0 for v in sums.values())  # real gradients
    n_kept = {n: int(m.sum()) for n, m in masks[2].items()}
    assert all({n: int(m.sum()) for n, m in ms.items()} == n_kept for ms in masks.values())
    for step in (4, 6, 8):  # a batch whose update is a generator step leaves the discriminator's masks alone
        if step % 3 == 0 and step % 2 == 0:
            for n in GAN.DISC:
                assert torch.equal(masks[step][n], masks[step - 2][n])


class OneStepSometimes(GAN):
    def training_step(self, batch, batch_idx):
        if batch_idx % 2:  # only the discriminator steps on odd batches
            opt_disc = self.optimizers()[1]
            x = batch[0].flatten(1)
            opt_disc.zero_grad()
            self.manual_backward(self.disc(x).pow(2).mean())
            opt_disc.step()
        else:
            super().training_step(batch, batch_idx)


def test_fractions_with_an_irregular_number_of_steps_per_batch_fail_at_once():
    cb = SparsityCallback(GMP(sparsity=0.8, end=0.5, every=2))
    with pytest.raises(SparsityConfigError, match="a training batch made 1 optimizer steps.*give start/end/every as int"):
        trainer(max_epochs=1, callbacks=[cb]).fit(OneStepSometimes(), random_loader())
    cb = SparsityCallback(GMP(sparsity=0.8, start=0, end=6, every=2))  # int steps: fine
    model = OneStepSometimes()
    trainer(max_epochs=1, callbacks=[cb]).fit(model, random_loader())
    names = GAN.GEN + GAN.DISC
    assert zeros(model, names) == pruned(shapes_of(model, names), 0.8)


class ManualAccumulation(TinyNet):
    """Manual optimization, one optimizer, a step every second batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.manual_backward(nn.functional.cross_entropy(self(batch[0]), batch[1]) / 2)
        if batch_idx % 2:
            opt.step()
            opt.zero_grad()


def test_fractions_with_one_manual_optimizer_that_skips_batches_fail_at_once():
    """docs/rules.md: the check runs with manual optimization whatever the number of optimizers (the schedule was
    resolved for twice the steps the fit makes, and GMP ended at 79 % of a 90 % target)."""
    cb = SparsityCallback(GMP(sparsity=0.9, end=1.0, every=2))
    with pytest.raises(SparsityConfigError, match="a training batch made 0 optimizer steps.*resolved for 1 steps per batch"):
        trainer(max_epochs=2, callbacks=[cb]).fit(ManualAccumulation(), random_loader())


# ---------------------------------------------------------- 2. frozen weights
def frozen_fc1():
    model = TinyNet()
    model.fc1.weight.requires_grad_(False)
    return model


def test_frozen_weights_are_not_targets_and_the_log_says_so(caplog):
    L.seed_everything(0)
    model = frozen_fc1()
    before = model.fc1.weight.detach().clone()
    cb = SparsityCallback(RigL(sparsity=0.8, every=2, end=12))
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=2, callbacks=[cb]).fit(model, random_loader())
    assert list(cb.targets) == ["conv.weight", "fc2.weight"]
    assert "frozen or in no optimizer and stay dense (not targets): fc1.weight" in caplog.text
    assert torch.equal(model.fc1.weight, before)


def test_frozen_weights_included_by_name_are_never_regrown_into():
    L.seed_everything(0)
    model = frozen_fc1()
    cb = SparsityCallback(RigL(sparsity=0.8, every=2, end=12), include="fc1.weight")
    start = {}

    class Grab(Callback):
        def on_train_start(self, trainer, pl_module):
            start.update({n: m.clone() for n, m in cb.masks.items()})

    trainer(max_epochs=2, callbacks=[cb, Grab()]).fit(model, random_loader())
    assert torch.equal(cb.masks["fc1.weight"], start["fc1.weight"])  # never moved
    assert not torch.equal(cb.masks["fc2.weight"], start["fc2.weight"])  # the trained layers did
    kept = int(cb.masks["fc1.weight"].sum())
    assert zeros(model, ["fc1.weight"])["fc1.weight"] == model.fc1.weight.numel() - kept
    assert int((model.fc1.weight[cb.masks["fc1.weight"]] == 0).sum()) == 0  # kept frozen weights keep their values


# -------------------------------------------- 3. models built in setup/configure_model
class BuiltInConfigureModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class HeadReplacedInSetup(TinyNet):
    def setup(self, stage):
        self.fc2 = nn.Linear(32, 10)  # e.g. a new head for the task at hand


@pytest.mark.parametrize("make, names", [
    (BuiltInConfigureModel, ["net.1.weight", "net.3.weight"]),
    (HeadReplacedInSetup, TARGETS),
])
def test_models_built_late_get_exact_sparsity_in_their_real_weights(make, names):
    L.seed_everything(0)
    model = make()
    cb = SparsityCallback(GMP(sparsity=0.75, start=0, end=8, every=2))
    trainer(max_epochs=1, callbacks=[cb]).fit(model, random_loader())
    assert list(cb.targets) == names
    assert all(cb.targets[n] is model.get_parameter(n) for n in names)  # not an orphaned tensor
    assert zeros(model, names) == pruned(shapes_of(model, names), 0.75)
    assert cb.sparsity_report().zeros == sum(zeros(model, names).values())


# ---------------------------------------------------- 4. data of unknown length
class Endless(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(1, 8, 8, generator=g), torch.randint(0, 10, (), generator=g)


class StopAt(Callback):
    def __init__(self, step):
        self.at = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.at:
            trainer.should_stop = True


def endless():
    return DataLoader(Endless(), batch_size=16)


def test_unknown_length_fractions_fail_at_fit_start_with_a_hint():
    cb = SparsityCallback(GMP(sparsity=0.9, end=0.75, every=4))
    with pytest.raises(SparsityConfigError, match="end=0.75 is a fraction of training, but the length of training is unknown"):
        trainer(max_epochs=1, callbacks=[cb, NoBatch()]).fit(TinyNet(), endless())


def test_unknown_length_with_int_steps_or_max_steps_works():
    L.seed_everything(0)
    model = TinyNet()
    cb = SparsityCallback(GMP(sparsity=0.9, start=0, end=12, every=4))
    trainer(max_epochs=1, callbacks=[cb, StopAt(16)]).fit(model, endless())
    assert cb.step == 16 and zeros(model, TARGETS) == pruned(shapes_of(model, TARGETS), 0.9)
    model = TinyNet()
    cb = SparsityCallback(GMP(sparsity=0.9, start=0, end=0.5, every=4))
    trainer(max_steps=20, max_epochs=-1, callbacks=[cb]).fit(model, endless())
    assert cb.method._steps.end == 10 and zeros(model, TARGETS) == pruned(shapes_of(model, TARGETS), 0.9)


# ------------------------------------------------------ 5. bad values found early
@pytest.mark.parametrize("make, match", [
    (lambda: SparsityCallback(GMP(sparsity=0.1, start=0, end=12, every=4, overrides={"fc1.weight": 0.99})), "cannot hold|does not fit"),
    (lambda: SparsityCallback(GMP(sparsity=0.1, distribution="global", overrides={"fc1.weight": 0.99}, end=12)), "do not fit a global"),
    (lambda: SparsityCallback(Static(0.9, overrides={"nothing.*": 0.5})), "overrides key 'nothing.\\*' matches no target"),
    (lambda: SparsityCallback(GraNet(0.9, initial_density=0.5, end=12, every=4, distribution="uniform"), include="bn.weight"), None),
])
def test_budgets_that_cannot_be_met_fail_before_the_first_batch(make, match):
    if match is None:  # a valid configuration trains
        trainer(max_epochs=2, callbacks=[make()]).fit(TinyNet(), random_loader())
        return
    with pytest.raises(SparsityConfigError, match=match):
        trainer(max_epochs=2, callbacks=[make(), NoBatch()]).fit(TinyNet(), random_loader())


def test_an_override_above_one_fails_at_construction_with_the_value_written():
    with pytest.raises(SparsityConfigError, match=r"overrides\['fc2.weight'\]=1.5 must be a number in \[0, 1\)"):
        GMP(sparsity=0.9, end=16, every=4, overrides={"fc2.weight": 1.5})  # once failed at step 12 with 1.3125


# ------------------------------------------------ 6. resume with another config
def first_run(tmp_path, method):
    t = trainer(max_epochs=1, callbacks=[SparsityCallback(method), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                enable_checkpointing=True)
    t.fit(TinyNet(), random_loader())
    return tmp_path / "last.ckpt"


@pytest.mark.parametrize("old, new, change", [
    (lambda: Static(0.9), lambda: Static(0.5), "Static.sparsity: was 0.9, now 0.5"),
    (lambda: Static(0.9), lambda: Static(0.9, distribution="uniform"), "Static.distribution: was 'erk', now 'uniform'"),
    (lambda: GMP(0.8, end=30, every=4), lambda: GMP(0.8, end=30, every=2), "GMP.every: was 4, now 2"),
])
def test_resume_with_a_changed_config_fails_naming_the_change(tmp_path, old, new, change):
    ckpt = first_run(tmp_path, old())
    with pytest.raises(SparsityConfigError, match=rf"another sparsity configuration \({change}\).*on_config_change='continue'"):
        trainer(max_epochs=2, callbacks=[SparsityCallback(new()), NoBatch()]).fit(TinyNet(), random_loader(), ckpt_path=ckpt)


def test_resume_with_a_changed_config_continues_when_asked(tmp_path):
    ckpt = first_run(tmp_path, Static(0.9, distribution="uniform"))
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["SparsityCallback"]["masks"]
    model = TinyNet()
    cb = SparsityCallback(Static(0.5, distribution="uniform"), on_config_change="continue")
    with pytest.warns(UserWarning, match="resuming with a changed configuration \\(Static.sparsity: was 0.9, now 0.5\\)"):
        trainer(max_epochs=2, callbacks=[cb]).fit(model, random_loader(), ckpt_path=ckpt)
    assert all(torch.equal(cb.masks[n], saved[n]) for n in TARGETS)  # the checkpoint's masks go on
    assert zeros(model, TARGETS) == pruned(shapes_of(model, TARGETS), 0.9)


def test_a_changed_seed_is_not_a_config_change(tmp_path):
    ckpt = first_run(tmp_path, Static(0.9))
    trainer(max_epochs=2, callbacks=[SparsityCallback(Static(0.9), seed=123)]).fit(TinyNet(), random_loader(), ckpt_path=ckpt)


# ---------------------------------------------------------------- 7. early stop
def test_early_stop_warns_below_target():
    L.seed_everything(0)
    cb = SparsityCallback(GMP(sparsity=0.9, start=0, end=30, every=2))
    with pytest.warns(UserWarning, match=r"training ended after step 6 of 32 optimizer steps at .*below the 90.00% that GMP aims at \(its schedule ends at step 30\).*finalize='prune'"):
        trainer(max_epochs=4, callbacks=[cb, StopAt(6)]).fit(TinyNet(), random_loader())


@pytest.mark.parametrize("make, distribution", [
    (lambda: GMP(sparsity=0.9, start=0, end=30, every=2), "uniform"),
    (lambda: GraNet(sparsity=0.9, start=0, end=30, every=2), "global"),
    (lambda: StochasticAnnealing(0.9, end=30, distribution="uniform"), "uniform"),
])
def test_finalize_prune_reaches_the_target_exactly_when_training_stops_early(make, distribution):
    L.seed_everything(0)
    model = TinyNet()
    cb = SparsityCallback(make(), finalize="prune")
    trainer(max_epochs=4, callbacks=[cb, StopAt(6)]).fit(model, random_loader())
    n = sum(math.prod(s) for s in shapes_of(model, TARGETS).values())
    if distribution == "uniform":
        assert zeros(model, TARGETS) == pruned(shapes_of(model, TARGETS), 0.9)
    else:
        assert sum(zeros(model, TARGETS).values()) == n - round(0.1 * n)
    assert cb.sparsity_report().zeros == sum(zeros(model, TARGETS).values())
    for n_, p in cb.targets.items():  # optimizer state of pruned weights is zero too
        state = cb_state(cb, model, n_)
        assert state is None or (state[~cb.masks[n_]] == 0).all()


def cb_state(cb, model, name):
    opt = model.trainer.optimizers[0]
    return opt.state.get(cb.targets[name], {}).get("momentum_buffer")


# ----------------------------------------------------------------- 8. NaN / inf
def test_nan_weights_are_pruned_first_and_set_to_zero():
    L.seed_everything(0)
    model = TinyNet()

    class Poison(Callback):  # NaN in 40 active fc1 weights right before the update after step 4
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 4:  # runs before the SparsityCallback, whose update follows
                with torch.no_grad():
                    pl_module.fc1.weight.view(-1)[:40] = float("nan")

    cb = SparsityCallback(GMP(sparsity=0.5, start=4, end=4, every=1), reapply="always")
    with pytest.warns(UserWarning, match="non-finite values at the update of step 4: weights in \\['fc1.weight'\\]"):
        trainer(max_steps=4, max_epochs=1, callbacks=[Poison(), cb]).fit(model, random_loader())
    assert torch.isfinite(model.fc1.weight).all()
    assert not cb.masks["fc1.weight"].view(-1)[:40].any()  # the NaN weights were the ones pruned
    assert zeros(model, TARGETS) == pruned(shapes_of(model, TARGETS), 0.5)


def test_non_finite_grow_scores_are_never_preferred():
    mask = torch.tensor([True, True, False, False, False, False])
    w = torch.tensor([0.9, float("nan"), 0, 0, 0, 0])
    g = torch.tensor([0.0, 0.0, float("nan"), float("inf"), 0.1, 0.2])
    new = drop_and_grow(mask, w, g, 1)  # the NaN weight is dropped; growth goes to |g| = 0.2, not NaN/inf
    assert new.tolist() == [True, False, False, False, False, True]
    assert int(drop_and_grow(mask, w, torch.full((6,), float("nan")), 2).sum()) == 2  # counts stay exact


# ------------------------------------------- 12. annealing with activation checkpointing
class Checkpointed(TinyNet):
    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        h = torch.utils.checkpoint.checkpoint(self.fc1, x.flatten(1), use_reentrant=False)  # re-run in backward
        return self.fc2(torch.relu(h))


def test_activation_checkpointing_recomputes_with_the_sample_of_its_forward():
    L.seed_everything(0)
    model = Checkpointed()
    cb = SparsityCallback(StochasticAnnealing(0.8, initial_probability=0.5, end=100))
    used = []

    class Grads(Callback):  # the gradient of fc1 is zero exactly where the sample excluded a weight
        def on_train_batch_start(self, trainer, pl_module, *args):
            used.append(pl_module.fc1.weight.detach().ne(0) | cb.masks["fc1.weight"])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grad = pl_module.fc1.weight.grad
            assert (grad[~used[-1]] == 0).all() and (grad[used[-1]] != 0).any()

    with pytest.warns(UserWarning, match="beyond"):
        trainer(max_steps=3, max_epochs=1, callbacks=[cb, Grads()]).fit(model, random_loader())
    assert cb._forward == 0 and len(used) == 3  # one sample per batch: backward did not resample


# --------------------------------------------------------------- a method by name
def test_a_method_by_name_is_the_method_with_those_arguments():
    L.seed_everything(0)
    model = TinyNet()
    cb = SparsityCallback("rigl", sparsity=0.8, every=2, end=8, distribution="uniform", seed=3)
    assert type(cb.method) is RigL and cb.method.hparams()["every"] == 2 and cb.seed == 3
    trainer(max_epochs=1, callbacks=[cb]).fit(model, random_loader())
    assert zeros(model, TARGETS) == pruned(shapes_of(model, TARGETS), 0.8)
