"""Dynamic sparse training: RigL, SET and GraNet, on tensors and inside real Lightning Trainers."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core.regrowth import drop_and_grow, drop_count, drop_smallest, grow_largest
from sparsetrain.methods import SET, GraNet, RigL, SparsityContext
from tests.helpers import TinyNet, random_loader, trainer

STEPS_PER_EPOCH = 8  # random_loader(): 128 samples, batch 16


class Probe(Callback):
    """Runs after the SparsityCallback: records masks every step and checks the invariants."""

    def __init__(self, sc: SparsityCallback):
        self.sc = sc
        self.masks: dict[int, dict[str, torch.Tensor]] = {}  # by global step
        self.metrics: dict[int, dict[str, float]] = {}

    def on_fit_start(self, trainer, pl_module):
        self.masks = {self.sc.step: {n: m.clone() for n, m in self.sc.masks.items()}}  # sc.step: restored on resume

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        prev, masks = self.masks[step - 1], {n: m.clone() for n, m in self.sc.masks.items()}
        optimizer = trainer.optimizers[0]
        for n, p in self.sc.targets.items():
            grown = masks[n] & ~prev[n]
            states = [s for s in optimizer.state[p].values() if torch.is_tensor(s) and s.shape == p.shape]
            assert states, "the optimizer has per-weight state (momentum / Adam moments)"
            for t in [p.detach(), *states]:
                assert (t[~masks[n]] == 0).all(), f"masked weight or its optimizer state is non-zero in {n}"
                assert (t[grown] == 0).all(), f"grown weight or its optimizer state is non-zero in {n}"
        if self.sc.method.is_update_step(step):
            self.metrics[step] = dict(self.sc.method.last_metrics)
        self.masks[step] = masks


class StopAfter(Callback):
    """Ends the fit after ``epochs`` epochs, as a preemption at an epoch boundary would."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def fit(method, epochs=3, optimizer="sgd", seed=0, ckpt_path=None, callbacks=()):
    L.seed_everything(seed, verbose=False)
    model = TinyNet(optimizer=optimizer)
    sc = SparsityCallback(method, seed=seed)
    probe = Probe(sc)
    t = trainer(max_epochs=epochs, callbacks=[sc, probe, *callbacks])
    t.fit(model, random_loader(), ckpt_path=ckpt_path)
    return sc, probe, model, t


def counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def moved(probe, t):
    """Whether any mask changed at step ``t``."""
    return any(not torch.equal(probe.masks[t][n], probe.masks[t - 1][n]) for n in probe.masks[t])


# ------------------------------------------------------------- pure selection
def test_drop_and_grow_hand_computed():
    mask = torch.tensor([[True, True, True, False], [False, False, True, False]])
    w = torch.tensor([[0.5, -0.1, 0.3, 0.0], [0.0, 0.0, -0.2, 0.0]])
    g = torch.tensor([[9.0, 9.0, 9.0, 0.1], [-0.7, 0.3, 9.0, 0.5]])
    # drop the two smallest |w| among active: -0.1 at (0,1) and -0.2 at (1,2); grow the two largest |g|
    # among the rest: (0,1) and (1,2) have |g| = 9 but were just dropped; they are candidates.
    assert drop_and_grow(mask, w, g, 2).tolist() == mask.tolist()
    # with the dropped positions' gradients small, growth goes to |g| = 0.7 at (1,0) (a negative
    # gradient: magnitudes count) and 0.5 at (1,3); the kept (0,0) and (0,2) with |g| = 9 are not candidates
    g2 = g.clone()
    g2[0, 1] = g2[1, 2] = 0.0
    expect = [[True, False, True, False], [True, False, False, True]]
    assert drop_and_grow(mask, w, g2, 2).tolist() == expect
    assert drop_and_grow(mask, w, g2, lambda n: drop_count(n, 0.5)).tolist() == expect  # k = floor(0.5 * 4)
    assert drop_smallest(mask, w, 1).tolist() == [[True, False, True, False], [False, False, True, False]]
    assert grow_largest(mask, g2, 1)[1, 0] and grow_largest(mask, g2, 1).sum() == 5
    assert drop_and_grow(mask, w, g, 0).tolist() == mask.tolist()
    assert torch.equal(w[0], torch.tensor([0.5, -0.1, 0.3, 0.0])) and mask.sum() == 4  # inputs untouched
    dense = torch.ones(3, 3, dtype=torch.bool)  # a dense layer never changes
    assert drop_and_grow(dense, torch.rand(3, 3), torch.rand(3, 3), 4).all()
    with pytest.raises(ValueError):
        drop_and_grow(mask, w, g, 5)


def test_rigl_update_grows_largest_gradient_per_layer():
    params = {"a": torch.tensor([0.9, 0.05, 0.0, 0.0, 0.4]), "b": torch.tensor([[0.3, 0.0], [0.0, -0.01]])}
    masks = {"a": torch.tensor([True, True, False, False, True]), "b": torch.tensor([[True, False], [False, True]])}
    grads = {"a": torch.tensor([0.0, 0.0, -0.8, 0.1, 0.0]), "b": torch.tensor([[0.0, 0.2], [-0.6, 0.0]])}
    method = RigL(sparsity=0.5, every=10, end=100, drop_fraction=0.5, drop_fraction_schedule="constant")
    method.setup(100)
    ctx = SparsityContext(params, masks, 100, torch.Generator().manual_seed(0))
    new = method.update(ctx, 10, grads)  # k = floor(0.5 * 3) = 1 in "a", floor(0.5 * 2) = 1 in "b"
    assert new["a"].tolist() == [True, False, True, False, True]  # 0.05 out, |-0.8| in
    assert new["b"].tolist() == [[True, False], [True, False]]  # -0.01 out, |-0.6| in
    assert method.last_metrics == {"rigl/drop_fraction": 0.5, "rigl/regrown": 2.0}
    assert masks["a"].tolist() == [True, True, False, False, True]  # the old masks are not modified


def test_drop_count_rounding():
    assert drop_count(10, 0.3) == 3 and drop_count(10, 0.29) == 2 and drop_count(10, 0.21, "ceil") == 3
    assert drop_count(7, 0.0, "ceil") == 0 and drop_count(5, 1.0) == 5


def test_rigl_schedule_edges():
    m = RigL(sparsity=0.9, every=10, end=50, drop_fraction=0.3)
    m.setup(100)
    assert [t for t in range(101) if m.is_update_step(t)] == [10, 20, 30, 40, 50]  # no update at step 0
    assert m.drop_fraction_at(10) == 0.3 and m.drop_fraction_at(50) == 0.0 and m.drop_fraction_at(80) == 0.0
    assert m.drop_fraction_at(30) == pytest.approx(0.15)  # halfway between first update and end
    assert m.needs_grads(20) and not m.needs_grads(21)
    s = SET(sparsity=0.9, every=10, end=0.5, drop_fraction_schedule="constant")
    s.setup(100)
    assert s.drop_fraction_at(50) == s.drop_fraction_at(10) == 0.3 and not s.needs_grads(10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RigL(drop_fraction=0.0),
        lambda: RigL(drop_fraction=1.5),
        lambda: RigL(drop_fraction_schedule="linear"),
        lambda: RigL(distribution="global"),
        lambda: RigL(init="kaiming"),
        lambda: RigL(every=0),
        lambda: RigL(end=1.5),
        lambda: SET(sparsity=1.0),
        lambda: GraNet(initial_density=0.05, sparsity=0.9),
        lambda: GraNet(initial_density=0.0),
        lambda: GraNet(schedule="exp"),
        lambda: GraNet(start=100, end=10),
        lambda: GraNet(regrowth_fraction=2.0),
        lambda: GraNet(distribution="gaussian"),
    ],
)
def test_bad_config_fails_at_construction(make):
    with pytest.raises(SparsityConfigError):
        make()


def test_bad_config_fails_at_setup():
    with pytest.raises(SparsityConfigError, match="start"):
        GraNet(start=0.8, end=0.5).setup(100)
    with pytest.warns(UserWarning, match="beyond"):  # one rule for every method (was an error in GraNet only)
        GraNet(end=200).setup(100)
    with pytest.raises(SparsityConfigError, match="unknown"):
        RigL(end=0.5).setup(None)


# ------------------------------------------------------------ inside a Trainer
@pytest.mark.parametrize("method_cls", [RigL, SET])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_rigl_set_keep_layer_counts_and_freeze_after_end(method_cls, optimizer):
    end = 12
    sc, probe, _, _ = fit(method_cls(sparsity=0.8, every=2, end=end, drop_fraction=0.3), optimizer=optimizer)
    first = counts(probe.masks[0])
    assert sum(first.values()) == round(0.2 * sum(m.numel() for m in probe.masks[0].values()))
    for masks in probe.masks.values():  # every step, not only update steps
        assert counts(masks) == first
    assert sorted(probe.metrics) == [2, 4, 6, 8, 10, 12]
    prefix = method_cls.prefix
    assert probe.metrics[2][f"{prefix}/drop_fraction"] == 0.3  # alpha at the first update
    assert probe.metrics[end][f"{prefix}/drop_fraction"] == 0.0  # 0 at end
    assert probe.metrics[2][f"{prefix}/regrown"] > 0
    changed = [t for t in range(1, len(probe.masks)) if moved(probe, t)]
    assert changed and set(changed) <= {2, 4, 6, 8, 10}  # the topology moves only at updates before end
    assert sorted(probe.masks) == list(range(3 * STEPS_PER_EPOCH + 1))


@pytest.mark.parametrize("initial_density", [1.0, 0.5])
def test_granet_follows_cubic_schedule_exactly(initial_density):
    start, end, every, s_f = 2, 14, 3, 0.9
    method = GraNet(sparsity=s_f, initial_density=initial_density, start=start, end=end, every=every)
    sc, probe, _, _ = fit(method, optimizer="sgd")
    n = sum(m.numel() for m in probe.masks[0].values())
    s_i = 1 - initial_density
    assert sum(counts(probe.masks[0]).values()) == round(initial_density * n)
    assert sorted(probe.metrics) == [2, 5, 8, 11, 14, 17, 20, 23]
    for t, masks in probe.masks.items():
        if t == 0:
            continue
        last = max(u for u in [0, *probe.metrics] if u <= t)  # density holds between updates
        s_t = s_i if last == 0 else s_f + (s_i - s_f) * (1 - (min(last, end) - start) / (end - start)) ** 3
        assert sum(counts(masks).values()) == round((1 - s_t) * n), t
    assert sum(counts(probe.masks[end]).values()) == round((1 - s_f) * n)  # exactly on target at end
    assert all(probe.metrics[t]["granet/regrown"] > 0 for t in (5, 8, 17))  # regrowth, also after end
    changed = [t for t in range(end + 1, len(probe.masks)) if moved(probe, t)]
    assert changed and set(changed) <= {17, 20, 23}  # after end the topology still moves, at constant density
    assert probe.metrics[5]["granet/regrowth_fraction"] == pytest.approx(0.25 * (1 + math.cos(math.pi * 3 / 22)))
    assert probe.metrics[23]["granet/pruned"] == 0


@pytest.mark.parametrize(
    "make",
    [lambda: RigL(sparsity=0.8, every=3, end=20), lambda: SET(sparsity=0.8, every=3, end=20)],
    ids=["rigl", "set"],
)
def test_same_seed_same_masks(make):
    runs = [fit(make(), epochs=2) for _ in range(2)]
    (a, _, ma, _), (b, _, mb, _) = runs
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n])
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    other = fit(make(), epochs=1, seed=1)[0]
    assert any(not torch.equal(a.masks[n], other.masks[n]) for n in a.masks)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RigL(sparsity=0.8, every=5, end=0.75),
        lambda: SET(sparsity=0.8, every=5, end=0.75),
        lambda: GraNet(sparsity=0.8, initial_density=0.5, start=3, end=0.8, every=5),
    ],
    ids=["rigl", "set", "granet"],
)
def test_exact_resume_between_updates(make, tmp_path):
    """4 epochs straight == 2 epochs, checkpoint, resume to 4 (checkpoint at step 16, updates at 15 and 20)."""
    straight = fit(make(), epochs=4)
    first = fit(make(), epochs=4, callbacks=[StopAfter(2)])  # same length of training: same schedule
    assert first[3].global_step == 2 * STEPS_PER_EPOCH
    path = tmp_path / "half.ckpt"
    first[3].save_checkpoint(path)
    resumed = fit(make(), epochs=4, seed=7, ckpt_path=str(path))  # other seed: state must come from the ckpt
    for n in straight[0].masks:
        assert torch.equal(straight[0].masks[n], resumed[0].masks[n])
    assert any(not torch.equal(straight[0].masks[n], first[0].masks[n]) for n in first[0].masks)
    for (name, pa), pb in zip(straight[2].named_parameters(), resumed[2].parameters()):
        assert torch.equal(pa, pb), name


# ------------------------------------------------------------------------ DDP
class RankData(TinyNet):
    """Each rank trains on its own data set (seeded by the rank), with no distributed sampler."""

    def train_dataloader(self):
        return random_loader(seed=100 + self.global_rank)


class SaveMasks(Callback):
    def __init__(self, sc, folder):
        self.sc, self.folder = sc, folder

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: m.clone() for n, m in self.sc.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.first_x = batch[0].sum().item()

    def on_train_end(self, trainer, pl_module):
        state = {"masks": self.sc.masks, "initial": self.initial, "x": self.first_x}
        torch.save({**state, "w": dict(pl_module.named_parameters())}, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: RigL(sparsity=0.8, every=3, end=12), id="rigl"),
        pytest.param(lambda: SET(sparsity=0.8, every=3, end=12), id="set", marks=pytest.mark.slow),
        pytest.param(lambda: GraNet(sparsity=0.8, end=12, every=3), id="granet", marks=pytest.mark.slow),
    ],
)
def test_ddp_masks_identical_on_both_ranks(make, tmp_path):
    """Two CPU processes (gloo), different data per rank: same masks and weights (~25 s: process start)."""
    L.seed_everything(0, verbose=False)
    sc = SparsityCallback(make())
    t = trainer(max_epochs=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                callbacks=[sc, SaveMasks(sc, str(tmp_path))])
    t.fit(RankData())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["x"] != r1["x"]  # different data per rank
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n])
    for n in r0["w"]:
        assert torch.equal(r0["w"][n], r1["w"][n])
    assert any(m.sum() < m.numel() for m in r0["masks"].values())
    assert any(not torch.equal(r0["masks"][n], r0["initial"][n]) for n in r0["masks"])  # the topology moved
