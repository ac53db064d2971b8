"""One engine under every loop: the Lightning callback, Fabric, a plain PyTorch loop and the Hugging Face Trainer give
bitwise the same masks; the plain loop with GradScaler, several optimizers and an exact resume; no Lightning needed."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain import SparsityCallback
from tests.helpers import TinyNet, random_loader
from tests.loops import EPOCHS, LOOPS, STEPS

ROOT = Path(__file__).resolve().parents[1]
# int steps: every loop resolves the same schedule (16 optimizer steps)
METHODS = {
    "static": ("static", dict(sparsity=0.9)),
    "gmp": ("gmp", dict(sparsity=0.9, start=2, end=12, every=2)),
    "rigl": ("rigl", dict(sparsity=0.8, every=3, end=14, distribution="uniform")),
    "srste": ("srste", dict(structure="2:4", every=2, end=12)),
}


def zeros_in_masked_positions(model, masks) -> int:
    return sum(int(model.get_parameter(n)[~m].ne(0).sum()) for n, m in masks.items())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_loop_gives_bitwise_the_same_masks_and_the_same_weights(name, tmp_path):
    pytest.importorskip("transformers")
    method, args = METHODS[name]
    runs = {loop: (run(method, args, tmp_path) if loop == "hf" else run(method, args)) for loop, run in LOOPS.items()}
    model, engine = runs["lightning"]
    assert engine.step == STEPS
    for loop, (other_model, other) in runs.items():
        assert other.step == STEPS, loop
        assert list(other.masks) == list(engine.masks), loop
        for n, m in engine.masks.items():
            assert torch.equal(other.masks[n].cpu(), m.cpu()), (loop, n)
        for n, p in model.named_parameters():
            torch.testing.assert_close(other_model.get_parameter(n), p, rtol=1e-5, atol=1e-6, msg=f"{loop} {n}")
        assert zeros_in_masked_positions(other_model, other.masks) == 0, loop
    kept = sum(int(m.sum()) for m in engine.masks.values())
    assert engine.report().numel - engine.report().zeros == kept  # counted in the weights


def test_plain_loop_detach_removes_every_hook_and_keeps_the_sparse_weights():
    L.seed_everything(0)
    model = TinyNet()
    optimizer = model.configure_optimizers()
    engine = sparsetrain.attach(model, optimizer, "rigl", sparsity=0.9, every=2, end=6, total_steps=8, seed=0)
    assert len(optimizer._optimizer_step_pre_hooks) == len(optimizer._optimizer_step_post_hooks) == 1
    batches = list(random_loader())
    for x, y in batches[:4]:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    engine.detach()
    assert engine.handles == [] and engine.optimizers == []  # the optimizer let go
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    zeros = engine.report().zeros
    x, y = batches[4]
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # after detach: an ordinary step, the engine does nothing
    assert engine.step == 4 and engine.report().zeros < zeros


def _train(model, optimizers, engine_args, steps=STEPS, scaler=None, start=0, state=None, clip=None, mask_calls=1):
    """A plain loop over ``random_loader`` batches ``start..steps-1`` (each batch steps every optimizer once);
    ``clip``: ``engine.mask_gradients()`` (``mask_calls`` times) then ``clip_grad_norm_(model.parameters(), clip)``
    before the steps."""
    engine = sparsetrain.attach(model, optimizers, total_steps=steps * len(optimizers), seed=0, state=state, **engine_args)
    batches = [b for _ in range(EPOCHS) for b in random_loader()][start:steps]
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if clip is not None:
            for _ in range(mask_calls):
                engine.mask_gradients()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for optimizer in optimizers:
            scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad()
    return engine


@pytest.mark.parametrize("variant", ["grad_scaler", "mask_then_clip", "mask_twice_then_clip"])
def test_a_loop_with_the_usual_extras_makes_the_run_of_the_bare_loop(variant):
    """``grad_scaler``: ``scaler.step`` unscales before the hooks (a power-of-two scale: unscaling is exact).
    ``mask_then_clip``: docs/engine.md's recipe, ``engine.mask_gradients()`` then ``clip_grad_norm_``; the update
    still ranks the pruned positions by their gradients (an infinite max norm clips nothing), also when the
    gradients are masked twice (a helper and the loop) before the step."""
    args = dict(method="rigl", sparsity=0.8, every=3, end=14, distribution="uniform")
    L.seed_everything(0)
    model = TinyNet()
    plain = _train(model, [model.configure_optimizers()], args)
    L.seed_everything(0)
    other_model = TinyNet()
    extras = {
        "grad_scaler": dict(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)),
        "mask_then_clip": dict(clip=float("inf")),
        "mask_twice_then_clip": dict(clip=float("inf"), mask_calls=2),
    }[variant]
    other = _train(other_model, [other_model.configure_optimizers()], args, **extras)
    assert other.step == plain.step == STEPS
    for n, m in plain.masks.items():
        assert torch.equal(other.masks[n], m), n
    torch.testing.assert_close(other_model.fc1.weight, model.fc1.weight)
    assert zeros_in_masked_positions(other_model, other.masks) == 0  # counted in the model the user keeps


@pytest.mark.parametrize("method,args", [("srste", dict(structure="2:4", every=2, end=12)), ("annealing", dict(sparsity=0.8))])
def test_soft_masks_put_the_parameters_back_before_the_loop_clips(method, args):
    """Between backward and step (where the Hugging Face Trainer clips) ``model.parameters()`` are the parameters
    the optimizer steps, so clipping sees and scales their gradients."""
    L.seed_everything(0)
    model = TinyNet()
    optimizer = model.configure_optimizers()
    engine = sparsetrain.attach(model, optimizer, method, total_steps=STEPS, seed=0, **args)
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for x, y in [b for _ in range(EPOCHS) for b in random_loader()][:6]:
        nn.functional.cross_entropy(model(x), y).backward()
        assert {id(p) for p in model.parameters()} == stepped
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        assert norm <= 1e-3 * 1.001
        optimizer.step()
        optimizer.zero_grad()
    engine.detach()


def test_plain_loop_with_two_optimizers_counts_every_step_and_prunes_each_optimizers_weights():
    L.seed_everything(0)
    model = TinyNet()
    convs = torch.optim.SGD(list(model.conv.parameters()) + list(model.bn.parameters()), lr=0.05, momentum=0.9)
    linears = torch.optim.Adam(list(model.fc1.parameters()) + list(model.fc2.parameters()), lr=0.01)
    engine = _train(model, [convs, linears], dict(method="gmp", sparsity=0.9, start=2, end=20, every=3))
    assert engine.step == 2 * STEPS and engine.optimizers == [convs, linears]
    report = engine.report()
    assert report.zeros == report.numel - round(0.1 * report.numel) and report.numel == 72 + 4096 + 320
    assert zeros_in_masked_positions(model, engine.masks) == 0


def test_plain_loop_resumes_exactly_from_torch_save(tmp_path):
    args = dict(method="rigl", sparsity=0.8, every=3, end=14, distribution="uniform")
    L.seed_everything(0)
    straight_model = TinyNet()
    straight = _train(straight_model, [straight_model.configure_optimizers()], args)

    L.seed_everything(0)
    model = TinyNet()
    optimizer = model.configure_optimizers()
    half = _train(model, [optimizer], args, steps=8)  # the same run, stopped after step 8 and saved
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sparsity": half.state_dict()}, tmp_path / "run.pt")

    saved = torch.load(tmp_path / "run.pt", weights_only=False)
    L.seed_everything(123)  # another init: everything comes from the files
    resumed_model = TinyNet()
    resumed_model.load_state_dict(saved["model"])
    optimizer = resumed_model.configure_optimizers()
    optimizer.load_state_dict(saved["optimizer"])
    resumed = _train(resumed_model, [optimizer], args, start=8, state=saved["sparsity"])
    assert resumed.step == straight.step == STEPS
    for n, m in straight.masks.items():
        assert torch.equal(resumed.masks[n], m), n
    for n, p in straight_model.named_parameters():
        assert torch.equal(resumed_model.get_parameter(n), p), n


def test_the_library_imports_and_trains_without_lightning():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lightning"] = None
        sys.modules["pytorch_lightning"] = None
        import torch
        from torch import nn
        import sparsetrain, sparsetrain.engine, sparsetrain.methods
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = sparsetrain.attach(model, optimizer, "gmp", sparsity=0.75, start=0, end=6, every=2, total_steps=8)
        for _ in range(8):
            nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 4, (16,))).backward()
            optimizer.step()
            optimizer.zero_grad()
        engine.detach()
        assert engine.report().zeros == 3 * (8 * 32 + 32 * 4) // 4, engine.report().table()
        assert "lightning" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
        try:
            sparsetrain.SparsityCallback
        except ImportError:
            print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("method", ["rigl", pytest.param("gmp", marks=pytest.mark.slow), pytest.param("rigl_sparse", marks=pytest.mark.slow)])
def test_fabric_ddp_on_two_processes_keeps_identical_masks_on_every_rank(tmp_path, method):
    script = Path(__file__).with_name("fabric_ddp.py")
    result = subprocess.run([sys.executable, str(script), str(tmp_path), method], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 16 and len(rank0["history"]) == 16  # 64 samples per rank / 8 * 2 epochs
    for step, (m0, m1) in enumerate(zip(rank0["history"], rank1["history"])):
        assert all(torch.equal(m0[n], m1[n]) for n in m0), step
    for n, w in rank0["weights"].items():
        assert torch.equal(w, rank1["weights"][n]), n
    final = rank0["history"][-1]
    assert sum(int(m.sum()) for m in final.values()) == round(0.2 * sum(m.numel() for m in final.values()))
    for n, m in final.items():
        assert int(rank0["weights"][n][~m].ne(0).sum()) == 0, n
    assert not all(torch.equal(rank0["history"][0][n], final[n]) for n in final)  # the masks moved


def test_attach_after_dense_steps_clears_the_momentum_of_the_weights_it_prunes():
    L.seed_everything(0)
    model = TinyNet()
    optimizer = model.configure_optimizers()  # SGD with momentum: zero-preserving, masks are not re-applied per step
    batches = list(random_loader())
    for x, y in batches[:3]:  # dense steps first: momentum everywhere
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    engine = sparsetrain.attach(model, optimizer, "static", sparsity=0.9, seed=0)
    for x, y in batches[3:5]:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert zeros_in_masked_positions(model, engine.masks) == 0
    for n, m in engine.masks.items():
        assert int(optimizer.state[model.get_parameter(n)]["momentum_buffer"][~m].ne(0).sum()) == 0, n


def test_a_fused_optimizer_under_grad_scaler_counts_only_the_steps_it_makes():
    L.seed_everything(0)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    engine = sparsetrain.attach(model, optimizer, "rigl", sparsity=0.8, every=2, end=8, distribution="uniform", seed=0)
    for i, (x, y) in enumerate(list(random_loader())[:6]):
        loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if i == 2 else 1.0)  # step 3 overflows
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # a fused optimizer: GradScaler calls its step also on inf, which changes nothing
        scaler.update()
        optimizer.zero_grad()
    made = int(optimizer.state[model.fc1.weight]["step"])
    assert made == 5 and engine.step == made
    assert zeros_in_masked_positions(model, engine.masks) == 0


class _AdamNet(TinyNet):
    def __init__(self, fused: bool, inf_at: int | None = None):
        super().__init__()
        self.fused, self.inf_at = fused, inf_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == self.inf_at else loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused)


def _lightning_16_mixed(model, callbacks, batches):
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # a power of two: unscaling is exact
    L.Trainer(
        max_epochs=1, limit_train_batches=batches, callbacks=callbacks, logger=False, limit_val_batches=0,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, random_loader())


def test_lightning_16_mixed_with_a_fused_optimizer_unscales_what_the_engine_reads():
    """A fused optimizer unscales inside its step, so Lightning hands the callback scaled gradients: SR-STE's
    decay term must be scaled with them (the run of a non-fused Adam, to float tolerance)."""
    runs = {}
    for fused in (False, True):
        L.seed_everything(0)
        model = _AdamNet(fused)
        cb = SparsityCallback("srste", structure="2:4", every=2, end=6, exclude="conv.*", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _lightning_16_mixed(model, [cb], 8)
        runs[fused] = (model, cb.engine.masks)
    for n, m in runs[False][1].items():
        assert torch.equal(runs[True][1][n], m), n
    torch.testing.assert_close(runs[True][0].fc1.weight, runs[False][0].fc1.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused_adam"])
def test_lightning_skips_the_update_of_a_step_grad_scaler_skips(fused):
    """Lightning counts a step GradScaler skips (inf/NaN gradients); RigL's update on it must not rank by those
    gradients: it is skipped, and the masks stay as they were, with no non-finite warning."""
    L.seed_everything(0)
    model = _AdamNet(fused, inf_at=2)  # step 3, RigL's first update, overflows
    cb = SparsityCallback("rigl", sparsity=0.8, every=3, end=6, distribution="uniform", exclude="conv.*", seed=0)
    before = {}

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                before.update({n: m.clone() for n, m in cb.engine.masks.items()})

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the non-finite warning of an update on inf gradients
        warnings.filterwarnings("ignore", message="(?!sparsetrain)")
        _lightning_16_mixed(model, [Grab(), cb], 4)
    assert cb.engine.step == 4
    for n, m in before.items():
        assert torch.equal(cb.engine.masks[n], m), n
    assert zeros_in_masked_positions(model, cb.engine.masks) == 0 and all(torch.isfinite(p).all() for p in model.parameters())


class _Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool | None):
        super().__init__()
        self.use_reentrant = use_reentrant  # None: no activation checkpointing
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        for layer in (self.a, self.b):
            if self.use_reentrant is None:
                x = torch.relu(layer(x))
            else:
                x = torch.utils.checkpoint.checkpoint(lambda t, layer=layer: torch.relu(layer(t)), x, use_reentrant=self.use_reentrant)
        return self.c(x)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method,args", [("srste", dict(structure="2:4")), ("annealing", dict(sparsity=0.5))])
def test_soft_masks_under_activation_checkpointing_give_the_gradients_of_the_plain_forward(method, args, use_reentrant):
    """Checkpointed segments recompute their forward in the backward (a nested backward per segment when
    reentrant): they must see the sampled weights of the forward, whenever the parameters go back."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 16, requires_grad=True), torch.randint(0, 4, (8,))
    base = _Checkpointed(None)
    grads = {}
    for mode in (None, use_reentrant):
        model = copy.deepcopy(base)
        model.use_reentrant = mode
        params = dict(model.named_parameters())  # what the optimizer steps
        engine = sparsetrain.attach(model, torch.optim.SGD(params.values(), lr=0.1), method, total_steps=10, seed=1, **args)
        nn.functional.cross_entropy(model(x), y).backward()
        grads[mode] = {n: p.grad.clone() for n, p in params.items()}
        engine.detach()
    for n, g in grads[None].items():
        torch.testing.assert_close(grads[use_reentrant][n], g, msg=n)


def test_a_resume_from_soft_masks_into_a_shorter_schedule_hardens_them():
    """SR-STE saved in its soft phase (dense weights), resumed with fewer total steps so its fraction ``end=0.5``
    is already past: the masks are hard now and the resume prunes the weights (no 'weights not saved with it')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sparsetrain.attach(model, optimizer, "srste", structure="2:4", end=0.5, total_steps=20, seed=0)
    for _ in range(6):
        nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = engine.state_dict()
    assert state["soft"] is True
    engine.detach_hooks()
    resumed = sparsetrain.attach(model, optimizer, "srste", structure="2:4", end=0.5, total_steps=8, seed=0, state=state)
    assert not resumed.stochastic()
    assert zeros_in_masked_positions(model, resumed.masks) == 0 and resumed.report().global_sparsity == pytest.approx(0.5, abs=0.01)
    resumed.detach()
