"""``compute="sparse"|"auto"`` with real Trainers and loops: the same masks and weights as the masked path, every
method with hard masks, N:M, the plain loop; what cannot run sparse is named or refused at the start."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.checkpoint import load_masks
from tests.helpers import TinyNet, random_loader, trainer

STEPS = 20  # 160 samples in batches of 8: 20 optimizer steps
METHODS = {
    "static": dict(method="static", sparsity=0.9),
    "gmp": dict(method="gmp", sparsity=0.9, start=2, end=16, every=2),
    "rigl": dict(method="rigl", sparsity=0.9, every=3, end=18, distribution="uniform"),
    "set": dict(method="set", sparsity=0.9, every=3, end=18),
    "granet": dict(method="granet", sparsity=0.9, initial_density=0.5, start=0, end=16, every=4, regrowth_end=18),
    "gmp_2:4": dict(method="gmp", sparsity=0.5, start=2, end=16, every=2, distribution="uniform", structure="2:4"),
}


class MLP(L.LightningModule):
    """Linear layers only (64-96-96-10): every target can run on sparse kernels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


class SequentialMLP(MLP):
    """The same layers in an ``nn.Sequential``: each CSR layer hands its output to the next in the CSR layout."""

    def __init__(self):
        super().__init__()
        del self.fc1, self.fc2, self.fc3
        self.body = nn.Sequential(nn.Linear(64, 96), nn.ReLU(inplace=True), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 10))

    def forward(self, x):
        return self.body(x.flatten(1))


class Kernels(L.Callback):
    """What ran each target layer, after every training batch (``compute="masked"``: nothing)."""

    def __init__(self, cb):
        self.cb, self.choices, self.links = cb, [], []

    def on_train_batch_end(self, trainer, *args):
        sparse = self.cb.engine.sparse
        self.choices.append({} if sparse is None else {r["layer"]: r["choice"] for r in sparse.table()})
        self.links.append({} if sparse is None else {r["layer"]: r["feeds"] for r in sparse.table() if "feeds" in r})


def fit(compute: str, args: dict, model_class=MLP):
    L.seed_everything(0)
    model, cb = model_class(), SparsityCallback(seed=0, compute=compute, **args)
    cb.kernels = Kernels(cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=1, callbacks=[cb, cb.kernels]).fit(model, random_loader(n=8 * STEPS, batch_size=8))
    return model, cb


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("compute", ["sparse", "auto"])
def test_sparse_kernels_give_the_masks_and_weights_of_the_masked_path(name, compute):
    masked, cb_masked = fit("masked", METHODS[name])
    sparse, cb_sparse = fit(compute, METHODS[name])
    assert cb_sparse.step == cb_masked.step == STEPS and cb_sparse.engine.sparse is None  # kernels gone after fit
    for n, m in cb_masked.masks.items():
        assert torch.equal(cb_sparse.masks[n], m), n
        assert int(sparse.get_parameter(n)[~m].ne(0).sum()) == 0, n
    for n, p in masked.named_parameters():
        torch.testing.assert_close(sparse.get_parameter(n), p, rtol=1e-5, atol=1e-6, msg=n)
    assert list(sparse.state_dict()) == list(masked.state_dict())
    if compute == "sparse":  # every layer ran on the CSR kernels from the first batch on
        assert all(c == {"fc1.weight": "csr", "fc2.weight": "csr", "fc3.weight": "csr"} for c in cb_sparse.kernels.choices)
    else:  # auto decides every layer at its first forward, and again at the forward after a mask change
        choices = cb_sparse.kernels.choices
        assert set(choices[0].values()) <= {"csr", "masked"} and all(set(c.values()) <= {"csr", "masked", "undecided"} for c in choices)


@pytest.mark.parametrize("name", ["static", "rigl", "granet"])
def test_linked_layers_in_a_sequential_give_the_masks_and_weights_of_the_masked_path(name):
    masked, cb_masked = fit("masked", METHODS[name], SequentialMLP)
    sparse, cb_sparse = fit("sparse", METHODS[name], SequentialMLP)
    assert all(links == {"body.0.weight": "body.2.weight", "body.2.weight": "body.4.weight"} for links in cb_sparse.kernels.links)
    for n, m in cb_masked.masks.items():
        assert torch.equal(cb_sparse.masks[n], m), n
        assert int(sparse.get_parameter(n)[~m].ne(0).sum()) == 0, n
    for n, p in masked.named_parameters():
        torch.testing.assert_close(sparse.get_parameter(n), p, rtol=1e-5, atol=1e-6, msg=n)


class ValidatedSequentialMLP(SequentialMLP):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))


class PrunedInValidation(L.Callback):
    """Non-zero weights at pruned positions in the weights validation runs with (the EMA average, swapped in)."""

    def __init__(self, cb):
        self.cb, self.found, self.batches = cb, 0, 0

    def on_validation_batch_start(self, trainer, pl_module, *args):
        if self.cb.masks is not None:
            self.found += sum(int(pl_module.get_parameter(n)[~m].ne(0).sum()) for n, m in self.cb.masks.items())
            self.batches += 1


@pytest.mark.skipif(not hasattr(L.pytorch.callbacks, "EMAWeightAveraging"), reason="EMAWeightAveraging needs Lightning 2.6")
@pytest.mark.parametrize("compute", ["masked", "sparse"])
def test_linked_sparse_kernels_leave_the_masks_in_every_tensor_the_user_gets(compute, tmp_path):
    """RigL on linked CSR layers with an EMA average, validation and checkpoints by ``val_loss``: the model after fit,
    the weights validation runs with, the average, a checkpoint saved after fit, ``last.ckpt`` and the best checkpoint
    hold exact zeros at every pruned position (the kernels read only kept values, so a stray weight would not show
    in the loss)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    L.seed_everything(0)
    model, cb = ValidatedSequentialMLP(), SparsityCallback(seed=0, compute=compute, **METHODS["rigl"])
    average, probe = EMAWeightAveraging(decay=0.9), PrunedInValidation(cb)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1, save_last=True)
    fit_trainer = trainer(max_epochs=2, callbacks=[cb, average, probe, checkpoints], enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_trainer.fit(model, random_loader(n=8 * STEPS // 2, batch_size=8), random_loader(n=16, batch_size=8, seed=1))
        fit_trainer.save_checkpoint(tmp_path / "after_fit.ckpt")

    def at_pruned(get, masks) -> tuple[int, int]:  # (zeros at pruned positions, pruned positions)
        return sum(int(get(n)[~m].eq(0).sum()) for n, m in masks.items()), sum(int((~m).sum()) for m in masks.values())

    zeros, pruned = at_pruned(model.get_parameter, cb.masks)
    assert zeros == pruned > 0
    assert probe.batches > 0 and probe.found == 0
    averaged = getattr(average._average_model, "module", average._average_model)
    assert at_pruned(averaged.get_parameter, cb.masks) == (pruned, pruned)
    assert all(torch.equal(m, cb.masks[n]) for n, m in load_masks(tmp_path / "after_fit.ckpt").items())
    # a checkpoint from the middle of RigL's schedule holds the masks of its step: counted against those
    for path in (tmp_path / "after_fit.ckpt", tmp_path / "last.ckpt", checkpoints.best_model_path):
        zeros, pruned_then = at_pruned(torch.load(path, weights_only=False)["state_dict"].get, load_masks(path))
        assert zeros == pruned_then > 0, path


def test_rigl_ranks_growth_by_the_dense_gradient_on_its_update_steps_only():
    from sparsetrain.engine import SparsityEngine

    e = SparsityEngine("rigl", sparsity=0.9, every=3, end=18, compute="sparse", seed=0)
    model = MLP()
    optimizer = model.configure_optimizers()
    e.setup(model, [optimizer], STEPS)
    e.begin(0)
    wanted = [e.method.needs_grads(t + 1) for t in range(STEPS)]
    seen = []
    for t in range(STEPS):
        seen.append(e.sparse.dense_grads)
        e.advance(t + 1)
    assert seen == wanted and any(wanted) and not all(wanted)
    e.detach_hooks()


def test_sparse_in_a_plain_loop_matches_the_masked_plain_loop():
    def run(compute):
        L.seed_everything(0)
        model = MLP()
        optimizer = model.configure_optimizers()
        engine = sparsetrain.attach(model, optimizer, total_steps=STEPS, seed=0, compute=compute, **METHODS["rigl"])
        for x, y in random_loader(n=8 * STEPS, batch_size=8):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        engine.detach()
        return model, engine

    masked, e_masked = run("masked")
    sparse, e_sparse = run("sparse")
    for n, m in e_masked.masks.items():
        assert torch.equal(e_sparse.masks[n], m), n
    for n, p in masked.named_parameters():
        torch.testing.assert_close(sparse.get_parameter(n), p, rtol=1e-5, atol=1e-6, msg=n)


def test_a_layer_that_cannot_run_sparse_is_named_at_fit_start():
    with pytest.raises(SparsityConfigError, match=r"compute='sparse' cannot run these targets on sparse kernels:\s+conv.weight: "):
        trainer(max_epochs=1, callbacks=[SparsityCallback("static", sparsity=0.9, compute="sparse")]).fit(TinyNet(), random_loader())
    cb = SparsityCallback("static", sparsity=0.9, compute="auto", seed=0)  # auto: the convolution stays masked
    trainer(max_epochs=1, callbacks=[cb]).fit(TinyNet(), random_loader())
    assert cb.sparsity_report().zeros == cb.sparsity_report().numel - sum(int(m.sum()) for m in cb.masks.values())


def test_soft_masks_with_sparse_kernels_are_refused_at_construction():
    for method in ("srste", "annealing"):
        with pytest.raises(SparsityConfigError, match=r"compute='sparse' runs hard masks on sparse kernels; .* use compute='masked'"):
            SparsityCallback(method, sparsity=0.5, compute="sparse")
    with pytest.raises(SparsityConfigError, match="compute='fast' is unknown; allowed: masked, sparse, auto"):
        SparsityCallback("static", sparsity=0.5, compute="fast")


def test_a_fit_that_raises_leaves_no_sparse_kernels_on_the_model():
    """An error in ``training_step`` (a notebook user then loads other weights and evaluates): Lightning runs no
    teardown hook after an exception, and the layers must compute with their current weights again."""

    class Failing(MLP):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    L.seed_everything(0)
    model = Failing()
    cb = SparsityCallback("static", sparsity=0.9, compute="sparse", seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, random_loader())
    assert cb.engine.sparse is None
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in layers)
    with torch.no_grad():
        for m in layers:
            m.weight.fill_(0.01)  # other, dense weights
        x = torch.randn(4, 64)
        assert torch.allclose(layers[0](x), nn.functional.linear(x, layers[0].weight, layers[0].bias))
