"""The masks are an invariant of the model: right when other components write, swap or pick the weights.

Every test is a real Trainer with Lightning's own components, and counts zeros in the tensors the user gets: the
model after fit, the model under validation, ``last.ckpt`` and the best checkpoint. The model is the issue's:
conv(1->16, 3x3) + fc1(256->64) + fc2(64->10), 17,168 prunable weights; 90 % is exactly 15,451 zeros.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.tuner import Tuner
from torch import nn

from sparsetrain import SparsityCallback, SparsityModelCheckpoint
from sparsetrain.methods import GMP, SRSTE, RigL, Static
from tests.helpers import random_loader, trainer

TARGETS = ["backbone.0.weight", "backbone.4.weight", "head.weight"]
TOTAL, ZEROS_90 = 144 + 256 * 64 + 640, 15451


class Net(L.LightningModule):
    """conv(1->16, 3x3) + fc1(256->64) in ``backbone``, fc2(64->10) in ``head``; logs ``val_acc``."""

    def __init__(self, lr: float = 0.05, batch_size: int = 16):
        super().__init__()
        self.lr, self.batch_size = lr, batch_size
        self.backbone = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return random_loader(batch_size=self.batch_size)

    def val_dataloader(self):
        return random_loader(n=32, batch_size=16, seed=1)


def zeros(module: nn.Module, names=TARGETS) -> int:
    return sum(int((module.get_parameter(n) == 0).sum()) for n in names)


def zeros_in(state_dict: dict, names=TARGETS) -> int:
    return sum(int((state_dict[n] == 0).sum()) for n in names)


def off_mask(module_or_state, masks) -> int:
    """Non-zero weights at masked positions."""
    get = module_or_state.get if isinstance(module_or_state, dict) else module_or_state.get_parameter
    return sum(int(get(n)[~m.cpu()].ne(0).sum()) for n, m in masks.items())


class ValidationProbe(Callback):
    """Non-zero weights at masked positions in the weights validation runs with (after every swap)."""

    def __init__(self, cb):
        self.cb, self.found, self.batches = cb, 0, 0

    def on_validation_batch_start(self, trainer, pl_module, *args):
        if self.cb.masks is not None:
            self.found += off_mask(pl_module, self.cb.masks)
            self.batches += 1


# ------------------------------------------------------------------- 1. the tuner
@pytest.mark.parametrize("make", [lambda: Static(0.9), lambda: GMP(0.9, end=0), lambda: RigL(0.9, every=4, end=24)], ids=["static", "gmp_one_shot", "rigl"])
@pytest.mark.parametrize("tune", ["lr_find", "scale_batch_size"])
def test_a_tuner_before_fit_changes_nothing(make, tune, tmp_path):
    def run(tuned: bool):
        L.seed_everything(0)
        model, cb = Net(), SparsityCallback(make(), seed=0)
        t = trainer(max_epochs=4, callbacks=[cb], default_root_dir=tmp_path)
        if tuned and tune == "lr_find":
            Tuner(t).lr_find(model, num_training=8, update_attr=False)
        elif tuned:
            Tuner(t).scale_batch_size(model, mode="power", max_trials=2, steps_per_trial=2)
            model.batch_size = 16  # what a run without the tuner trains with
        start = zeros(model)
        t.fit(model)
        return model, cb, start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, cb_plain, _ = run(False)
        tuned, cb_tuned, at_start = run(True)
    assert at_start == 0  # the tuner's trial fit left the weights as they were
    assert zeros(tuned) == zeros(plain) == ZEROS_90
    for n, m in cb_plain.masks.items():
        assert torch.equal(cb_tuned.masks[n], m), n
    for n, p in plain.named_parameters():
        torch.testing.assert_close(tuned.get_parameter(n), p, msg=n)


# --------------------------------------------------------------- 2. weight averaging
AVERAGING = {
    "ema": lambda: L.pytorch.callbacks.EMAWeightAveraging(decay=0.9),
    "swa": lambda: StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1),
}


@pytest.mark.parametrize("averaging", list(AVERAGING))
@pytest.mark.parametrize("make", [lambda: GMP(0.9, start=0, end=24, every=4), lambda: RigL(0.9, every=4, end=28)], ids=["gmp", "rigl"])
@pytest.mark.parametrize("first", [True, False], ids=["sparsity_first", "averaging_first"])
def test_the_averaged_model_holds_the_masks_in_validation_checkpoints_and_at_fit_end(averaging, make, first, tmp_path):
    if averaging == "ema" and not hasattr(L.pytorch.callbacks, "EMAWeightAveraging"):
        pytest.skip("EMAWeightAveraging needs Lightning 2.6")
    L.seed_everything(0)
    model, cb, average = Net(), SparsityCallback(make(), seed=0), AVERAGING[averaging]()
    probe = ValidationProbe(cb)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    callbacks = [cb, average] if first else [average, cb]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=4, callbacks=[*callbacks, probe, checkpoints], enable_checkpointing=True).fit(model)
    # the average copied in at fit end: exactly 0 at every masked position; a weight grown after the average's last
    # update (RigL with SWA, which averages once per epoch) is still 0 in it, so the average can hold a few more zeros
    assert off_mask(model, cb.masks) == 0
    assert zeros(model) == ZEROS_90 if averaging == "ema" or isinstance(cb.method, GMP) else zeros(model) >= ZEROS_90
    assert probe.batches > 0 and probe.found == 0  # the averaged weights validation ran with
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert off_mask(last["state_dict"], cb.masks) == 0
    if averaging == "ema":  # WeightAveraging saves its average as the model's state_dict
        assert zeros_in(last["state_dict"]) == zeros(model)
    else:  # StochasticWeightAveraging keeps its average in its own state
        swa = next(v for k, v in last["callbacks"].items() if k.startswith("StochasticWeightAveraging"))
        assert off_mask(swa["average_model_state"], cb.masks) == 0
    average_model = average._average_model
    average_model = getattr(average_model, "module", average_model)
    assert off_mask(average_model, cb.masks) == 0


# ------------------------------------------------------ 3. a parameter group added later
class Unfreezing(BackboneFinetuning):
    def __init__(self):
        super().__init__(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0, should_align=False, train_bn=True)


class MidEpochZeros(Callback):
    """Zeros in the targets after every step of epoch 1 and later (the backbone trains from there)."""

    def __init__(self, cb):
        self.cb, self.off = cb, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.current_epoch >= 1:
            self.off.append(off_mask(pl_module, self.cb.masks))


def test_a_parameter_group_added_during_the_fit_has_its_gradients_masked(tmp_path):
    L.seed_everything(0)
    model, cb = Net(), SparsityCallback(Static(0.9), include="backbone.*.weight", seed=0)
    probe = MidEpochZeros(cb)
    mid = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1, filename="{step}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (t := trainer(max_epochs=3, callbacks=[Unfreezing(), cb, probe, mid], enable_checkpointing=True)).fit(model)
    assert list(cb.targets) == TARGETS
    before = torch.load(tmp_path / "step=12.ckpt", weights_only=False)["state_dict"]  # mid epoch 1: unfrozen
    assert zeros_in(before) == ZEROS_90 and max(probe.off) == 0 and len(probe.off) == 16
    assert len(t.optimizers[0].param_groups) == 2 and zeros(model) == ZEROS_90 and cb.engine.optimizers == []


def test_weights_unfrozen_during_the_fit_that_are_not_targets_are_named_at_fit_end():
    L.seed_everything(0)
    model, cb = Net(), SparsityCallback(Static(0.9), seed=0)
    with pytest.warns(UserWarning, match=r"2 prunable weights trained during the fit but are not targets.*backbone.0.weight, backbone.4.weight"):
        trainer(max_epochs=2, callbacks=[Unfreezing(), cb]).fit(model)
    assert list(cb.targets) == ["head.weight"]


# ----------------------------------------------------------- an unknown writer
class Noise(Callback):
    """Writes every weight after every batch (a component the engine does not know)."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(1e-3)


def test_an_unknown_component_that_writes_weights_is_named_and_the_masks_are_applied_again():
    L.seed_everything(0)
    model, cb = Net(), SparsityCallback(Static(0.9), seed=0)
    probe = ValidationProbe(cb)
    with pytest.warns(UserWarning, match=r"at validation start, .* pruned weights were non-zero .*components on this loop: Noise"):
        trainer(max_epochs=1, callbacks=[cb, Noise(), probe]).fit(model)
    assert probe.found == 0 and zeros(model) == ZEROS_90


# ------------------------------------------------ 6. the best checkpoint mid-schedule
class FallingScore(Net):
    """``val_acc`` falls with every validation: the best checkpoint is the first one."""

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", 1.0 - self.global_step / 1000)


@pytest.mark.parametrize("make", [lambda: GMP(0.99, start=0, end=24, every=4), lambda: SRSTE("2:4", every=4, end=24)], ids=["gmp", "srste"])
def test_a_best_checkpoint_from_the_middle_of_the_schedule_is_named_and_the_offered_fix_picks_a_final_one(make, tmp_path):
    L.seed_everything(0)
    model, cb = FallingScore(), SparsityCallback(make(), seed=0)
    best = ModelCheckpoint(dirpath=tmp_path / "plain", monitor="val_acc", mode="max")
    t = trainer(max_epochs=4, callbacks=[cb, best], enable_checkpointing=True)
    with pytest.warns(UserWarning, match="the best checkpoint .* before .* reached its final sparsity"):
        t.fit(model)
    state = torch.load(best.best_model_path, weights_only=False)["callbacks"][cb.state_key]
    assert state["step"] == 8 and state["final"] is False  # epoch 0
    assert zeros(model) == cb.sparsity_report().zeros and cb.engine.at_final_sparsity()
    with pytest.warns(UserWarning, match="saved at step 8 .* before .* reached its final sparsity"):
        t.validate(model, ckpt_path="best", verbose=False)

    L.seed_everything(0)
    model, cb = FallingScore(), SparsityCallback(make(), seed=0)
    fixed = SparsityModelCheckpoint(dirpath=tmp_path / "fixed", monitor="val_acc", mode="max")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=4, callbacks=[cb, fixed], enable_checkpointing=True).fit(model)
    assert not [w for w in caught if "best checkpoint" in str(w.message)]
    saved = torch.load(fixed.best_model_path, weights_only=False)
    assert saved["callbacks"][cb.state_key]["final"] is True and saved["global_step"] >= 24
    assert zeros_in(saved["state_dict"]) == cb.sparsity_report().zeros  # the final sparsity, in the file


# ------------------------------------------------- 7. a model that is already sparse
def sparse_model(tmp_path, make) -> str:
    L.seed_everything(0)
    model, cb = Net(), SparsityCallback(make(), seed=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True).fit(model)
    return str(tmp_path / "last.ckpt")


class AtFitStart(Callback):
    """Validation accuracy, weights and masks right after the sparsity callback's fit start (before any step)."""

    def __init__(self, cb):
        self.cb = cb

    def on_fit_start(self, trainer, pl_module):
        self.masks = {n: m.clone() for n, m in self.cb.masks.items()}
        x, y = next(iter(pl_module.val_dataloader()))
        with torch.no_grad():
            self.acc = float((pl_module(x).argmax(1) == y).float().mean())
        self.weights = {n: pl_module.get_parameter(n).detach().clone() for n in TARGETS}


@pytest.mark.parametrize("make", [lambda: Static(0.9), lambda: RigL(0.9, every=4, end=12)], ids=["static", "rigl"])
def test_a_new_callback_over_a_sparse_model_keeps_its_weights_when_the_budget_holds_them(make, tmp_path):
    path = sparse_model(tmp_path, make)
    model = Net.load_from_checkpoint(path)
    learned = {n: model.get_parameter(n).detach().clone() for n in TARGETS}
    x, y = next(iter(model.val_dataloader()))
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    cb = SparsityCallback(make(), seed=1)  # another seed: other random masks on a dense model
    probe = AtFitStart(cb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, callbacks=[cb, probe]).fit(model)
    assert not [w for w in caught if "already" in str(w.message)]
    for n in TARGETS:
        assert torch.equal(probe.weights[n], learned[n]), n  # no learned weight was zeroed
        assert not bool((learned[n].ne(0) & ~probe.masks[n]).any()), n  # every learned weight is in the masks
    assert probe.acc == acc
    assert sum(int(m.sum()) for m in cb.masks.values()) == TOTAL - ZEROS_90 and off_mask(model, cb.masks) == 0


def test_a_new_callback_whose_budget_cannot_hold_the_sparse_model_says_so(tmp_path):
    path = sparse_model(tmp_path, lambda: GMP(0.9, end=0, distribution="uniform"))
    model = Net.load_from_checkpoint(path)
    with pytest.warns(UserWarning, match=r"already 90.00% sparse .* zero .* of its 1,717 non-zero weights .*FixedMasks"):
        trainer(max_epochs=1, callbacks=[cb := SparsityCallback(Static(0.9, distribution="erk"), seed=1)]).fit(model)
    assert sum(int(m.sum()) for m in cb.masks.values()) == TOTAL - ZEROS_90 and off_mask(model, cb.masks) == 0


# ------------------------------------------------------- 8. continue to a lower sparsity
@pytest.mark.parametrize(
    "old,new",
    [
        (lambda: GMP(0.9, end=0), lambda: GMP(0.5, end=0)),
        (lambda: Static(0.9), lambda: Static(0.8)),
        (lambda: RigL(0.9, every=4, end=12), lambda: RigL(0.8, every=4, end=12)),
    ],
    ids=["gmp", "static", "rigl"],
)
def test_continue_to_a_lower_sparsity_says_at_resume_that_the_model_stays_as_sparse(old, new, tmp_path):
    path = sparse_model(tmp_path, old)
    model = Net()
    cb = SparsityCallback(new(), on_config_change="continue", seed=0)
    with pytest.warns(UserWarning, match=r"keep 1,717 weights \(90.00% sparse\).* No method revives pruned weights"):
        trainer(max_epochs=3, callbacks=[cb]).fit(model, ckpt_path=path)
    assert zeros(model) == ZEROS_90
    assert math.isclose(cb.sparsity_report().global_sparsity, ZEROS_90 / TOTAL)


def test_sparsity_model_checkpoint_without_monitor_is_a_plain_model_checkpoint(tmp_path):
    L.seed_everything(0)
    model, cb = Net(), SparsityCallback(GMP(0.9, start=0, end=40, every=4), seed=0)
    saver = SparsityModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, callbacks=[cb, saver], enable_checkpointing=True).fit(model)  # the schedule outlasts the fit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=16.ckpt", "step=8.ckpt"]
