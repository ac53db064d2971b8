"""SparsityCallback with real Lightning Trainers on a tiny model."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core import layer_counts
from sparsetrain.methods import GMP, Dense, Static
from tests.helpers import TinyNet, random_loader, straight_and_resumed, trainer

TARGETS = ["conv.weight", "fc1.weight", "fc2.weight"]


def shapes(model):
    return {n: tuple(dict(model.named_parameters())[n].shape) for n in TARGETS}


class Recorder(Callback):
    """Placed after the SparsityCallback: records zeros per target after every optimizer step."""

    def __init__(self, sparsity_cb):
        self.cb, self.zeros, self.masked_nonzero = sparsity_cb, {}, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.zeros[trainer.global_step] = {n: int((p == 0).sum()) for n, p in self.cb.targets.items()}
        for n, p in self.cb.targets.items():
            self.masked_nonzero += int((p[~self.cb.masks[n]] != 0).sum())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_gmp_reaches_exact_counts_and_zeros_stay_zero(optimizer, distribution):
    L.seed_everything(0)
    model = TinyNet(optimizer)
    bias_before = model.fc1.bias.detach().clone()
    cb = SparsityCallback(GMP(sparsity=0.9, start=2, end=12, every=3, distribution=distribution))
    rec = Recorder(cb)
    trainer(max_epochs=2, callbacks=[cb, rec]).fit(model, random_loader())  # 16 steps
    counts = {n: int(m.sum()) for n, m in cb.masks.items()}
    total = sum(math.prod(s) for s in shapes(model).values())
    if distribution == "uniform":
        assert counts == layer_counts(shapes(model), 0.9, "uniform")
    assert sum(counts.values()) == round(0.1 * total)
    for n, p in cb.targets.items():
        assert int((p == 0).sum()) == p.numel() - counts[n]  # zeros counted in the weights
    assert rec.masked_nonzero == 0  # masked weights were exactly zero after every step
    report = cb.sparsity_report()
    assert report.zeros == total - round(0.1 * total)
    assert (model.fc1.bias != 0).all() and not torch.equal(model.fc1.bias, bias_before)  # trained, dense
    assert (model.bn.weight != 0).all()


def test_gmp_follows_cubic_schedule_at_every_update():
    L.seed_everything(0)
    model = TinyNet()
    method = GMP(sparsity=0.8, start=2, end=14, every=4)  # updates after steps 2, 6, 10, 14
    cb = SparsityCallback(method)
    rec = Recorder(cb)
    trainer(max_epochs=2, callbacks=[cb, rec]).fit(model, random_loader())
    for step in (2, 6, 10, 14):
        expected = layer_counts(shapes(model), method.target_sparsity(step), "uniform")
        sizes = {n: math.prod(s) for n, s in shapes(model).items()}
        assert rec.zeros[step] == {n: sizes[n] - expected[n] for n in TARGETS}, step
    assert rec.zeros[1] == {n: 0 for n in TARGETS}  # nothing pruned before start
    assert rec.zeros[16] == rec.zeros[14]  # frozen after end
    assert method.target_sparsity(14) == 0.8
    assert method.target_sparsity(6) == pytest.approx(0.8 - 0.8 * (1 - 4 / 12) ** 3)


def test_gmp_prunes_at_fit_start_when_start_is_zero():
    model = TinyNet()
    cb = SparsityCallback(GMP(sparsity=0.5, initial_sparsity=0.5, start=0, end=0, every=1))
    rec = Recorder(cb)
    trainer(max_epochs=1, callbacks=[cb, rec]).fit(model, random_loader())
    assert rec.zeros[1] == {n: math.prod(s) - c for (n, s), c in zip(shapes(model).items(), layer_counts(shapes(model), 0.5, "uniform").values())}


def test_static_masks_never_change_and_have_erk_counts():
    L.seed_everything(1)
    model = TinyNet()
    cb = SparsityCallback(Static(sparsity=0.8, distribution="erk"), seed=7)
    masks_at_start = {}

    class Grab(Callback):
        def on_train_start(self, trainer, pl_module):
            masks_at_start.update({n: m.clone() for n, m in cb.masks.items()})

    trainer(max_epochs=2, callbacks=[cb, Grab()]).fit(model, random_loader())
    assert all(torch.equal(masks_at_start[n], cb.masks[n]) for n in TARGETS)
    assert {n: int(m.sum()) for n, m in cb.masks.items()} == layer_counts(shapes(model), 0.8, "erk")
    # the same seed gives the same masks
    cb2 = SparsityCallback(Static(sparsity=0.8, distribution="erk"), seed=7)
    trainer(max_epochs=1, callbacks=[cb2]).fit(TinyNet(), random_loader())
    assert all(torch.equal(cb.masks[n], cb2.masks[n]) for n in TARGETS)


def test_dense_reports_without_masks(tmp_path):
    cb = SparsityCallback(Dense())
    trainer(max_epochs=1, callbacks=[cb], logger=CSVLogger(tmp_path)).fit(TinyNet(), random_loader())
    assert cb.masks is None and cb.sparsity_report().global_sparsity == 0.0


def test_metrics_reach_the_trainers_loggers(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    cb = SparsityCallback(GMP(sparsity=0.75, start=0, end=8, every=4))
    trainer(max_epochs=2, callbacks=[cb], logger=logger).fit(TinyNet(), random_loader())
    text = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    for key in ("sparsity/global", "sparsity/target", "sparsity/layer/fc1.weight", "sparsity/mask_change/global"):
        assert key in header
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    last_global = [float(r["sparsity/global"]) for r in rows if r["sparsity/global"]][-1]
    assert last_global == pytest.approx(cb.sparsity_report().global_sparsity)
    assert last_global == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("method", ["gmp", "static"])
def test_exact_resume_from_epoch_checkpoint(tmp_path, method):
    """2E epochs straight == E epochs, checkpoint, fresh Trainer resumed to 2E (masks and weights)."""

    def make():
        if method == "gmp":  # updates after steps 2, 5, ..., 29: before and after the checkpoint at 16
            return SparsityCallback(GMP(sparsity=0.8, start=2, end=30, every=3))
        return SparsityCallback(Static(sparsity=0.8), seed=3)

    straight, cb_straight, resumed, cb_resumed = straight_and_resumed(make, tmp_path, warns_at_half=method == "gmp")
    assert cb_resumed.step == cb_straight.step == 32
    for n in TARGETS:
        assert torch.equal(cb_straight.masks[n], cb_resumed.masks[n])
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    # the checkpoint carries masks, method state, RNG state and the step
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["SparsityCallback"]
    assert state["step"] == 16 and list(state["masks"]) == TARGETS and state["masks"]["fc1.weight"].dtype == torch.bool


def test_resume_with_other_method_fails_clearly(tmp_path):
    t = trainer(max_epochs=1, callbacks=[SparsityCallback(Static(0.5)), ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True)
    t.fit(TinyNet(), random_loader())
    with pytest.raises(SparsityConfigError, match="written by method Static.*runs GMP"):
        trainer(max_epochs=2, callbacks=[SparsityCallback(GMP(0.5, end=4))]).fit(
            TinyNet(), random_loader(), ckpt_path=tmp_path / "last.ckpt"
        )


# --------------------------------------------------------- training features
def test_gradient_accumulation_and_clipping():
    L.seed_everything(0)
    cb = SparsityCallback(GMP(sparsity=0.7, start=0, end=6, every=2))
    rec = Recorder(cb)
    t = trainer(max_epochs=2, callbacks=[cb, rec], accumulate_grad_batches=2, gradient_clip_val=0.5)
    t.fit(TinyNet(), random_loader())  # 8 batches/epoch -> 4 optimizer steps/epoch
    assert t.global_step == 8 and cb.step == 8 and sorted(rec.zeros) == list(range(0, 9))  # 16 batches, 8 steps
    assert rec.masked_nonzero == 0
    assert cb.sparsity_report().global_sparsity == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(precision):
    """bf16 autocast, and fp16 autocast with a GradScaler (grads are masked after unscaling)."""
    L.seed_everything(0)
    cb = SparsityCallback(GMP(sparsity=0.6, start=0, end=8, every=2))
    rec = Recorder(cb)
    if precision == "16-mixed":  # Lightning maps 16-mixed to bf16 on CPU; build the fp16 + GradScaler plugin by hand
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        kwargs = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    else:
        kwargs = dict(precision=precision)
    trainer(max_epochs=1, callbacks=[cb, rec], **kwargs).fit(TinyNet(), random_loader())
    if precision == "16-mixed":
        assert scaler.get_scale() > 0  # the scaler ran
    assert rec.masked_nonzero == 0
    assert cb.sparsity_report().global_sparsity == pytest.approx(0.6, abs=0.01)


class SharedWeights(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(16, 16)
        self.decoder = nn.Linear(16, 16)
        self.decoder.weight = self.encoder.weight
        self.out = nn.Linear(16, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.decoder(torch.relu(self.encoder(x.flatten(1)[:, :16]))))
        return nn.functional.cross_entropy(self.out(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_shared_parameter_is_masked_once():
    model = SharedWeights()
    cb = SparsityCallback(GMP(sparsity=0.5, start=0, end=4, every=2))
    trainer(max_epochs=1, callbacks=[cb]).fit(model, random_loader())
    assert list(cb.targets) == ["encoder.weight", "out.weight"]
    assert model.decoder.weight is model.encoder.weight
    assert int((model.decoder.weight == 0).sum()) == 128


@pytest.mark.slow
def test_torch_compiled_module():
    L.seed_everything(0)
    model = TinyNet()
    cb = SparsityCallback(GMP(sparsity=0.8, start=0, end=6, every=2))
    rec = Recorder(cb)
    trainer(max_epochs=1, callbacks=[cb, rec]).fit(torch.compile(model), random_loader())
    assert rec.masked_nonzero == 0
    assert cb.sparsity_report().global_sparsity == pytest.approx(0.8, abs=0.01)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GMP(sparsity=1.0), r"sparsity=1.0 must be a number in \[0, 1\)"),
        (lambda: Static(sparsity=-0.5), r"sparsity=-0.5"),
        (lambda: GMP(start=20, end=10), "end=10 is before start=20"),
        (lambda: GMP(distribution="gaussian"), "distribution='gaussian' is unknown; allowed: uniform, erk, er, global"),
        (lambda: Static(distribution="global"), "distribution='global' is unknown; allowed: uniform, erk, er"),
        (lambda: GMP(end=1.5), r"end=1.5 is a float.*\(0, 1\]"),
        (lambda: SparsityCallback(42), "method=42 is not a sparsity method"),  # a name ("gmp") is fine since 0.2
        (lambda: SparsityCallback("gmq"), "method='gmq' is unknown; allowed: dense, static, gmp, rigl"),
        (lambda: SparsityCallback("rigl", sparsity=0.9, evry=100), "RigL does not take .*evry"),
        (lambda: SparsityCallback(GMP(), sparsity=0.5), "sparsity: method arguments go with a method name"),
    ],
)
def test_bad_config_at_construction(make, match):
    with pytest.raises(SparsityConfigError, match=match):
        make()


@pytest.mark.parametrize(
    "cb, model, match",
    [
        (lambda: SparsityCallback(GMP(start=0.6, end=0.3)), TinyNet, r"end=0.3 \(2 steps\) is before start=0.6 \(5 steps\)"),
        (lambda: SparsityCallback(GMP(), include="decoder.*"), TinyNet, "include='decoder.\\*' matches no parameter"),
        (lambda: SparsityCallback(Static(overrides={"fc2.weight": 1.2})), TinyNet, r"overrides\['fc2.weight'\]=1.2"),
        (lambda: SparsityCallback(Static(overrides={"head.*": 0.5})), TinyNet, "overrides key 'head.\\*' matches no target"),
    ],
)
def test_bad_config_fails_at_fit_start(cb, model, match):
    seen_steps = []

    class Spy(Callback):
        def on_train_batch_start(self, *args):
            seen_steps.append(1)

    with pytest.raises(SparsityConfigError, match=match):
        trainer(max_epochs=1, callbacks=[cb(), Spy()]).fit(model(), random_loader())
    assert not seen_steps  # nothing trained


class NoWeights(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)

    def training_step(self, batch, batch_idx):
        return self.norm(batch[0].flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_prunable_weights_fails_clearly():
    with pytest.raises(SparsityConfigError, match="NoWeights has no prunable weights"):
        trainer(max_epochs=1, callbacks=[SparsityCallback(GMP())]).fit(NoWeights(), random_loader())


# ------------------------------------------------- re-applying masks to weights
class AnyOptimizer(TinyNet):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def configure_optimizers(self):
        return self.make(self.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2),
        lambda p: torch.optim.Adadelta(p, weight_decay=1e-2),
    ],
    ids=["sgd", "adam", "adamw", "nadam", "radam", "adamax", "adagrad", "rmsprop", "adadelta"],
)
def test_zero_preserving_optimizers_keep_masked_weights_exactly_zero(make):
    """reapply='auto' skips the per-step weight multiply for these: the zeros must hold by themselves."""
    L.seed_everything(0)
    cb = SparsityCallback(GMP(sparsity=0.8, start=0, end=12, every=3))
    rec = Recorder(cb)
    trainer(max_epochs=2, callbacks=[cb, rec]).fit(AnyOptimizer(make), random_loader())
    assert not cb._reapply_every_step
    assert rec.masked_nonzero == 0


class NoisySGD(torch.optim.SGD):
    """An optimizer that moves every weight, zero gradient or not."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)
        return loss


def test_other_optimizers_get_masks_reapplied_after_every_step():
    cb = SparsityCallback(Static(sparsity=0.7))
    rec = Recorder(cb)
    trainer(max_epochs=1, callbacks=[cb, rec]).fit(AnyOptimizer(lambda p: NoisySGD(p, lr=0.01)), random_loader())
    assert cb._reapply_every_step and rec.masked_nonzero == 0
    with pytest.raises(SparsityConfigError, match="reapply='never' is unknown; allowed: auto, always"):
        SparsityCallback(Static(), reapply="never")


def test_gmp_never_revives_pruned_weights():
    """A schedule value below the current sparsity (e.g. a resumed run with a longer schedule) prunes nothing back."""
    import torch as _torch

    from sparsetrain.methods import SparsityContext

    params = {"w": _torch.arange(1.0, 11.0)}
    method = GMP(sparsity=0.8, start=0, end=10, every=1)
    method.setup(10)
    masks = {"w": _torch.tensor([False] * 8 + [True] * 2)}  # 80 % sparse already
    new = method.update(SparsityContext(params, masks, 10, _torch.Generator()), 5, None)  # target 0.7 there
    assert method.target_sparsity(5) < 0.8
    assert new["w"].tolist() == masks["w"].tolist()
