"""SparsityCallback paths in real Trainers: ddp_spawn reports, two callbacks on one Trainer,
stochastic masks on every training forward, and a second fit with the same callback."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core import layer_counts
from sparsetrain.methods import GMP, RigL, Static, StochasticAnnealing
from tests.helpers import TinyNet, random_loader, trainer

TARGETS = ["conv.weight", "fc1.weight", "fc2.weight"]


def weights(model: nn.Module, names=TARGETS) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def shapes(model: nn.Module, names=TARGETS) -> dict[str, tuple[int, ...]]:
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in names}


# ------------------------------------------------------------------ 1. ddp_spawn
class SaveRank0Masks(Callback):
    """In the worker processes: rank 0 saves its masks and trained weights at the end of fit."""

    def __init__(self, sc: SparsityCallback, folder: str):
        self.sc, self.folder = sc, folder

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save({"masks": {n: m.clone() for n, m in self.sc.masks.items()}, "w": weights(pl_module)},
                       f"{self.folder}/rank0.pt")


@pytest.mark.slow
def test_ddp_spawn_report_counts_the_weights_loaded_back_into_the_model(tmp_path):
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    initial = weights(model)
    cb = SparsityCallback(Static(sparsity=0.8))
    t = trainer(strategy="ddp_spawn", devices=2, max_epochs=1, use_distributed_sampler=False,
                callbacks=[cb, SaveRank0Masks(cb, str(tmp_path))])
    t.fit(model, random_loader())

    with pytest.raises(RuntimeError, match=r"(?s)ddp_spawn.*sparsity_report\(model\)"):
        cb.sparsity_report()  # the masks stayed in the workers

    trained = weights(model)
    assert all(not torch.equal(trained[n], initial[n]) for n in TARGETS)  # Lightning loaded the trained weights
    worker = torch.load(tmp_path / "rank0.pt")
    for n in TARGETS:
        assert torch.equal(trained[n], worker["w"][n])
        assert torch.equal(trained[n] == 0, ~worker["masks"][n])  # zeros exactly outside rank 0's masks

    report = cb.sparsity_report(model)
    assert list(report.layers) == TARGETS
    by_hand = {n: zeros(trained[n]) for n in TARGETS}
    numel = {n: trained[n].numel() for n in TARGETS}
    assert {n: report.layers[n].zeros for n in TARGETS} == by_hand
    assert {n: report.layers[n].numel for n in TARGETS} == numel
    assert report.global_sparsity == sum(by_hand.values()) / sum(numel.values())
    kept = layer_counts(shapes(model), 0.8, "erk")  # Static's ERK counts are exact
    assert by_hand == {n: numel[n] - kept[n] for n in TARGETS}
    assert abs(sum(by_hand.values()) - 0.8 * sum(numel.values())) <= len(TARGETS)  # one weight of rounding per layer
    assert abs(report.global_sparsity - 0.8) <= len(TARGETS) / sum(numel.values())


# --------------------------------------------------- 2. two callbacks, one Trainer
def two_callbacks():
    backbone = SparsityCallback(GMP(sparsity=0.9, start=0, end=4, every=2), exclude="fc2.weight")
    head = SparsityCallback(Static(sparsity=0.5, distribution="uniform"), exclude=["conv.weight", "fc1.weight"])
    return backbone, head


class RecordMasks(Callback):
    """Placed after the SparsityCallbacks: their masks at train start."""

    def __init__(self, *scs: SparsityCallback):
        self.scs, self.masks = scs, None

    def on_train_start(self, trainer, pl_module):
        self.masks = [{n: m.clone() for n, m in sc.masks.items()} for sc in self.scs]


def check_counts(model, backbone, head):
    w = weights(model)
    uniform_09 = layer_counts(shapes(model, ["conv.weight", "fc1.weight"]), 0.9, "uniform")
    assert list(backbone.targets) == ["conv.weight", "fc1.weight"]
    assert list(head.targets) == ["fc2.weight"]
    for n in ["conv.weight", "fc1.weight"]:
        assert zeros(w[n]) == w[n].numel() - uniform_09[n]
        assert torch.equal(w[n] == 0, ~backbone.masks[n])
    assert zeros(w["fc2.weight"]) == 160  # 320 * 0.5
    assert torch.equal(w["fc2.weight"] == 0, ~head.masks["fc2.weight"])


def test_two_callbacks_with_disjoint_targets_train_checkpoint_and_resume(tmp_path):
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    backbone, head = two_callbacks()
    assert backbone.state_key != head.state_key
    t = trainer(max_epochs=1, enable_checkpointing=True,
                callbacks=[backbone, head, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    t.fit(model, random_loader())
    check_counts(model, backbone, head)

    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    states = ckpt["callbacks"]
    assert backbone.state_key in states and head.state_key in states
    saved = {k: states[k]["masks"] for k in (backbone.state_key, head.state_key)}
    assert list(saved[backbone.state_key]) == ["conv.weight", "fc1.weight"]
    assert list(saved[head.state_key]) == ["fc2.weight"]
    for sc in (backbone, head):
        for n, m in sc.masks.items():
            assert torch.equal(saved[sc.state_key][n], m)

    L.seed_everything(1, verbose=False)
    model2 = TinyNet()
    backbone2, head2 = two_callbacks()
    record = RecordMasks(backbone2, head2)
    t2 = trainer(max_epochs=2, callbacks=[backbone2, head2, record])
    t2.fit(model2, random_loader(), ckpt_path=tmp_path / "last.ckpt")
    for sc, masks in zip((backbone, head), record.masks):
        assert list(masks) == list(saved[sc.state_key])
        for n in masks:
            assert torch.equal(masks[n], saved[sc.state_key][n])
    check_counts(model2, backbone2, head2)
    assert t2.global_step == 16


def test_two_callbacks_that_share_a_target_fail_at_fit_start():
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    first = SparsityCallback(Static(sparsity=0.5), exclude="fc2.weight")  # conv, fc1
    second = SparsityCallback(Static(sparsity=0.5), exclude="conv.weight")  # fc1, fc2
    assert first.state_key != second.state_key
    with pytest.raises(SparsityConfigError, match="both target fc1.weight"):
        trainer(max_epochs=1, callbacks=[first, second, Spy()]).fit(TinyNet(), random_loader())
    assert not seen


# ------------------------------------------- 3. a fresh sample on every training forward
class RDrop(TinyNet):
    """Two forwards per training batch (R-Drop); every forward records the fc1 weight it computed with."""

    def __init__(self):
        super().__init__()
        self._fc1 = [self.fc1.weight]  # the real parameter (a list: not registered as a parameter)
        self.train_records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_records: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        out = super().forward(x)  # the weight fc1 used is the one in its place now
        used, param = self.fc1.weight.detach().clone(), self._fc1[0].detach().clone()
        if self.training:
            self.train_records.append((used, param))
        else:
            self.val_records.append((self.trainer.global_step, used, param))
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        out1, out2 = self(x), self(x)
        ce = nn.functional.cross_entropy
        return ce(out1, y) + ce(out2, y) + nn.functional.mse_loss(out1, out2)

    def validation_step(self, batch, batch_idx):
        self(batch[0])


def check_sample(used: torch.Tensor, param: torch.Tensor, mask: torch.Tensor):
    assert torch.equal(used[mask], param[mask])  # the target positions carry the parameter's values
    assert not bool((used[mask] == 0).any())  # zeros only outside the mask
    outside_used, outside_param = used[~mask], param[~mask]
    sampled = outside_used != 0
    assert torch.equal(outside_used[sampled], outside_param[sampled])  # sampled: the parameter's value
    assert 0 < int(sampled.sum()) < outside_used.numel()  # p = 0.5 at the start: some in, some out


def rdrop_run():
    L.seed_everything(0, verbose=False)
    model = RDrop()
    cb = SparsityCallback(StochasticAnnealing(0.8, initial_probability=0.5, end=100), seed=123)
    t = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, callbacks=[cb])
    with pytest.warns(UserWarning, match="beyond"):
        t.fit(model, random_loader(), random_loader(n=32, seed=5))
    return model, cb


def test_stochastic_masks_sample_a_new_mask_on_every_training_forward():
    model, cb = rdrop_run()
    mask = cb.masks["fc1.weight"]
    assert 0 < int(mask.sum()) < mask.numel()
    assert len(model.train_records) == 6  # 3 batches, 2 forwards each
    for b in range(3):
        (used1, param1), (used2, param2) = model.train_records[2 * b], model.train_records[2 * b + 1]
        assert torch.equal(param1, param2)  # no optimizer step between the two forwards
        assert not torch.equal(used1, used2)  # two different samples
        check_sample(used1, param1, mask)
        check_sample(used2, param2, mask)
    assert not torch.equal(model.train_records[0][0], model.train_records[2][0])  # and new ones every batch

    # evaluation (sanity check at step 0, validation after step 3): w * mask, the same on every forward
    assert [s for s, _, _ in model.val_records] == [0, 0, 3, 3]
    for step, used, param in model.val_records:
        assert torch.equal(used, param * mask)
    assert torch.equal(model.val_records[0][1], model.val_records[1][1])
    assert torch.equal(model.val_records[2][1], model.val_records[3][1])
    assert isinstance(model.fc1.weight, nn.Parameter)  # the parameters are back after fit

    again, _ = rdrop_run()  # same seeds: bit-identical samples
    assert len(again.train_records) == len(model.train_records)
    for (u1, p1), (u2, p2) in zip(model.train_records, again.train_records):
        assert torch.equal(u1, u2) and torch.equal(p1, p2)
    for (_, u1, _), (_, u2, _) in zip(model.val_records, again.val_records):
        assert torch.equal(u1, u2)


class BodyTwice(L.LightningModule):
    """The targets live in a submodule that training_step calls directly, twice."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self._w = [self.body[1].weight]
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _record(self):
        self.records.append((self.body[1].weight.detach().clone(), self._w[0].detach().clone()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out1 = self.body(x)
        self._record()
        out2 = self.body(x)
        self._record()
        ce = nn.functional.cross_entropy
        return ce(out1, y) + ce(out2, y) + nn.functional.mse_loss(out1, out2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_stochastic_masks_sample_anew_when_a_submodule_is_called_twice():
    L.seed_everything(0, verbose=False)
    model = BodyTwice()
    cb = SparsityCallback(StochasticAnnealing(0.8, initial_probability=0.5, end=100), seed=3)
    with pytest.warns(UserWarning, match="beyond"):
        trainer(max_epochs=1, limit_train_batches=2, callbacks=[cb]).fit(model, random_loader())
    assert list(cb.targets) == ["body.1.weight", "body.3.weight"]
    mask = cb.masks["body.1.weight"]
    assert len(model.records) == 4
    for b in range(2):
        (used1, param1), (used2, param2) = model.records[2 * b], model.records[2 * b + 1]
        assert torch.equal(param1, param2)
        assert not torch.equal(used1, used2)
        check_sample(used1, param1, mask)
        check_sample(used2, param2, mask)


# ------------------------------------------------- 4. a second fit with the same callback
class AtTrainStart(Callback):
    """Placed after the SparsityCallback: its masks and the model's weights at train start."""

    def __init__(self, sc: SparsityCallback):
        self.sc = sc
        self.masks = self.weights = None

    def on_train_start(self, trainer, pl_module):
        self.masks = {n: m.clone() for n, m in self.sc.masks.items()}
        self.weights = weights(pl_module)


def test_second_fit_of_the_same_model_continues_and_a_new_model_gets_fresh_masks():
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    cb = SparsityCallback(RigL(sparsity=0.8, every=2, end=6))
    kept = layer_counts(shapes(model), 0.8, "erk")

    first = AtTrainStart(cb)
    trainer(max_epochs=1, callbacks=[cb, first]).fit(model, random_loader())
    masks1 = {n: m.clone() for n, m in cb.masks.items()}
    weights1 = weights(model)
    assert any(not torch.equal(masks1[n], first.masks[n]) for n in TARGETS)  # RigL moved the topology
    assert {n: int(m.sum()) for n, m in masks1.items()} == kept

    second = AtTrainStart(cb)
    trainer(max_epochs=1, callbacks=[cb, second]).fit(model, random_loader())
    for n in TARGETS:
        assert torch.equal(second.masks[n], masks1[n])  # continues from the masks of fit 1
        assert torch.equal(second.weights[n], weights1[n])  # nothing zeroed or changed at fit-2 start
    assert {n: int(m.sum()) for n, m in cb.masks.items()} == kept
    for n, w in weights(model).items():
        assert not bool(w[~cb.masks[n]].any())

    other = TinyNet()
    third = AtTrainStart(cb)
    trainer(max_epochs=1, callbacks=[cb, third]).fit(other, random_loader())
    assert all(cb.targets[n] is p for n, p in other.named_parameters() if n in TARGETS)
    assert {n: int(m.sum()) for n, m in third.masks.items()} == kept  # exact counts
    for n in TARGETS:
        assert torch.equal(third.masks[n], first.masks[n])  # drawn afresh from the same seed
        assert torch.equal(third.weights[n] == 0, ~third.masks[n])
    assert any(not torch.equal(third.masks[n], masks1[n]) for n in TARGETS)
    assert {n: int(m.sum()) for n, m in cb.masks.items()} == kept
