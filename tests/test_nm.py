"""N:M structured sparsity: exact N of every M after init, after every update and after resume,
for every method that makes masks; SR-STE's straight-through gradient; IMP levels that end N:M;
clear errors for what cannot be N:M.

TinyNet's conv has 1 * 3 * 3 = 9 inputs per output channel (not a multiple of 4: indivisible), fc1
128 and fc2 32 (both hold 2:4 and 1:4)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core.budgets import Budget
from sparsetrain.core.imp import imp_masks
from sparsetrain.core.nm import NMStructure
from sparsetrain.core.regrowth import drop_and_grow
from sparsetrain.methods import GMP, SET, SRSTE, GraNet, RigL, Static, StochasticAnnealing
from tests.helpers import TinyNet, random_loader, straight_and_resumed, trainer

STRUCTURED = ("fc1.weight", "fc2.weight")


def groups_of(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept count of every group, computed the slow, obvious way: rows of reshape(out, -1), cut in m."""
    rows = mask.reshape(mask.shape[0], -1)
    return torch.tensor([int(rows[r, c : c + m].sum()) for r in range(rows.shape[0]) for c in range(0, rows.shape[1], m)])


# ------------------------------------------------------------------------------ core


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "2-4", "a:b", 24, "2:4:8"])
def test_a_structure_that_is_not_n_m_fails_with_the_key(bad):
    with pytest.raises(SparsityConfigError, match=r"structure=.* must be 'N:M' with 1 <= N < M"):
        NMStructure.parse(bad)


@pytest.mark.parametrize("shape, n, m", [((6, 16), 2, 4), ((6, 16), 1, 4), ((5, 24), 4, 8), ((4, 8, 3, 3), 2, 4)])
def test_mask_keeps_the_n_largest_of_every_group_along_the_input_dim(shape, n, m):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0)).abs()
    mask = NMStructure(n, m).mask(scores)
    assert mask.shape == scores.shape and (groups_of(mask, m) == n).all()
    rows, kept = scores.reshape(shape[0], -1), mask.reshape(shape[0], -1)
    for r in range(rows.shape[0]):
        for c in range(0, rows.shape[1], m):
            top = set(rows[r, c : c + m].topk(n).indices.tolist())
            assert set(kept[r, c : c + m].nonzero().squeeze(1).tolist()) == top


def test_ties_go_to_the_lower_position_of_the_group():
    assert NMStructure(2, 4).mask(torch.ones(2, 8)).tolist() == [[True, True, False, False] * 2] * 2
    assert NMStructure(3, 8).mask(torch.tensor([[0.0, 1, 1, 0, 1, 1, 0, 0]])).tolist() == [[False, True, True, False, True, False, False, False]]


def test_protected_top_k_keeps_at_least_n_per_group_and_exactly_n_at_one_minus_n_over_m():
    s, scores = NMStructure(2, 4), torch.rand(8, 32, generator=torch.Generator().manual_seed(1))
    budget = Budget("uniform", structure="2:4")
    for sparsity in (0.0, 0.2, 0.37, 0.5):
        mask = budget.masks({"w": scores}, sparsity)["w"]
        assert int(mask.sum()) == round((1 - sparsity) * scores.numel())
        assert (s.group_counts(mask) >= 2).all()
    assert s.holds(mask)


def test_drop_and_grow_in_groups_keeps_every_group_count_and_moves_k():
    s, g = NMStructure(2, 4), torch.Generator().manual_seed(2)
    mask = s.mask(torch.rand(16, 32, generator=g))
    weights, grads = torch.randn(16, 32, generator=g) * mask, torch.randn(16, 32, generator=g)
    new = drop_and_grow(mask, weights, grads, 40, group_size=4)
    assert s.holds(new) and int((mask & ~new).sum()) == int((new & ~mask).sum()) <= 40
    dropped = (weights.abs() + (~mask) * 1e9).reshape(-1).topk(40, largest=False).indices  # the 40 smallest |w|
    regrown_or_kept = new.reshape(-1)[dropped]
    for i in dropped[~regrown_or_kept]:  # a dropped position left empty: its group grew a larger |grad|
        group = slice(int(i) // 4 * 4, int(i) // 4 * 4 + 4)
        grown = (new.reshape(-1)[group] & ~mask.reshape(-1)[group]).nonzero().squeeze(1)
        assert all(grads.reshape(-1)[group][j].abs() >= grads.reshape(-1)[i].abs() for j in grown)


def test_budget_rejects_what_cannot_be_n_m():
    with pytest.raises(SparsityConfigError, match=r"distribution='erk' cannot be combined with structure='2:4'.*'uniform'"):
        Budget("erk", structure="2:4")
    with pytest.raises(SparsityConfigError, match=r"sparsity=0.9 does not match structure='2:4'.*set sparsity=0.5"):
        RigL(0.9, "uniform", structure="2:4")
    with pytest.raises(SparsityConfigError, match="indivisible='x' is unknown"):
        Static(0.5, "uniform", structure="2:4", indivisible="x")
    with pytest.raises(SparsityConfigError, match="GraNet has no N:M option"):
        GraNet(0.5, structure="2:4")
    budget = Budget("uniform", structure="2:4", indivisible="error")
    with pytest.raises(SparsityConfigError, match=r"1 targets have an input size .* not a multiple of 4: conv.weight \(8, 1, 3, 3\)"):
        budget.check({"conv.weight": (8, 1, 3, 3), "fc.weight": (4, 8)}, 0.5)


def test_an_indivisible_layer_fails_at_fit_start_with_indivisible_error():
    cb = SparsityCallback(Static(0.5, "uniform", structure="2:4", indivisible="error"))
    with pytest.raises(SparsityConfigError, match=r"conv.weight \(8, 1, 3, 3\).*indivisible='dense'"):
        trainer(max_epochs=1, callbacks=[cb]).fit(TinyNet(), random_loader())


# ------------------------------------------------------------ every method, real Trainer


class GroupProbe(L.Callback):
    """After every batch (after the SparsityCallback's end-of-batch work) record the per-group counts."""

    def __init__(self, sparsity_cb: SparsityCallback, m: int):
        self.cb, self.m, self.seen = sparsity_cb, m, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append((trainer.global_step, {n: groups_of(self.cb.masks[n], self.m) for n in STRUCTURED}))


METHODS = {
    "static": lambda s: Static(s.sparsity, "uniform", structure=str(s)),
    "gmp": lambda s: GMP(s.sparsity, structure=str(s), start=2, end=10, every=2),
    "rigl": lambda s: RigL(s.sparsity, "uniform", structure=str(s), every=2, drop_fraction=0.5, end=14),
    "set": lambda s: SET(s.sparsity, "uniform", structure=str(s), every=2, drop_fraction=0.5, end=14),
    "srste": lambda s: SRSTE(str(s), end=14),
    "annealing": lambda s: StochasticAnnealing(s.sparsity, structure=str(s), start=2, end=8),
}


def fit(method, epochs=2, **kwargs):
    L.seed_everything(0)
    model, cb = TinyNet(), SparsityCallback(method, **kwargs)
    probe = GroupProbe(cb, method.budget.nm.m)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "structure=")  # the indivisible conv is reported; tested below
        trainer(max_epochs=epochs, callbacks=[cb, probe]).fit(model, random_loader())
    return model, cb, probe


@pytest.mark.parametrize("structure", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_group_keeps_exactly_n_after_init_and_every_update(name, structure):
    s = NMStructure.parse(structure)
    model, cb, probe = fit(METHODS[name](s))
    final_only = name == "gmp"  # GMP prunes unstructured with >= N per group, exactly N from `end` on
    for step, counts in probe.seen:
        for n in STRUCTURED:
            if name == "annealing" and step < 2:  # dense until start
                assert (counts[n] == s.m).all()
            elif final_only and step < 10:
                assert (counts[n] >= s.n).all() and (step < 4 or (counts[n] < s.m).any()), (step, n)
            else:
                assert (counts[n] == s.n).all(), (step, n)
    for n in STRUCTURED:
        assert s.holds(cb.masks[n])
        assert ((model.get_parameter(n) != 0) & ~cb.masks[n]).sum() == 0  # the weights hold the masks
        assert (groups_of(model.get_parameter(n) != 0, s.m) <= s.n).all()  # deployable N:M (grown weights may be 0)
    assert cb.masks["conv.weight"].all()  # indivisible='dense'
    total = sum(model.get_parameter(n).numel() for n in STRUCTURED)
    assert sum(int(cb.masks[n].sum()) for n in STRUCTURED) == total * s.n // s.m
    if name not in ("rigl", "set"):  # counted in the weights the model uses (RigL/SET grow weights at 0)
        for n in STRUCTURED:
            assert (groups_of(model.get_parameter(n) != 0, s.m) == s.n).all()
        assert int((model.conv.weight == 0).sum()) == 0


def test_rigl_n_m_really_moves_weights():
    _, static_cb, _ = fit(Static(0.5, "uniform", structure="2:4"))  # the same seed draws RigL's initial masks
    _, rigl_cb, _ = fit(RigL(0.5, "uniform", structure="2:4", every=2, drop_fraction=0.5, end=14))
    moved = sum(int((rigl_cb.masks[n] & ~static_cb.masks[n]).sum()) for n in STRUCTURED)
    assert moved > 0  # same seed, same initial masks: RigL's updates changed the topology


def test_gmp_groups_schedule_holds_the_same_count_in_every_group_at_every_update():
    method = GMP(0.5, structure="2:4", structure_schedule="groups", start=2, end=10, every=2)
    _, cb, probe = fit(method)
    for step, counts in probe.seen:
        last_update = max(t for t in range(step + 1) if t == 0 or method.is_update_step(t))
        n_t = round(4 * (1 - method.target_sparsity(last_update)))
        assert method.target_sparsity(step) in (0.0, 0.25, 0.5)
        for n in STRUCTURED:
            assert (counts[n] == n_t).all(), (step, n, n_t)
    assert [round(4 * (1 - method.target_sparsity(t))) for t in (0, 2, 4, 10)][-1] == 2


def test_indivisible_layers_are_reported_and_pruned_unstructured_on_request():
    with pytest.warns(UserWarning, match=r"1 targets cannot hold it .* kept dense .*conv.weight \(8, 1, 3, 3\)"):
        trainer(max_epochs=1, callbacks=[SparsityCallback(Static(0.5, "uniform", structure="2:4"))]).fit(TinyNet(), random_loader())
    model, cb, _ = fit(Static(0.5, "uniform", structure="2:4", indivisible="unstructured"))
    assert int(cb.masks["conv.weight"].sum()) == 36  # half of 72, no structure
    assert int((model.conv.weight == 0).sum()) == 36  # counted in the weight itself


def test_a_finished_n_m_run_with_dense_layers_does_not_warn_that_it_is_short():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(GMP(0.5, structure="2:4", start=2, end=10, every=2))
    assert not [w for w in caught if "below the" in str(w.message)]


def test_n_m_resume_is_exact(tmp_path):
    make = lambda: SparsityCallback(RigL(0.5, "uniform", structure="2:4", every=3, drop_fraction=0.5, end=28))  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "structure=")
        straight, cb_straight, resumed, cb_resumed = straight_and_resumed(make, tmp_path)
    for n in cb_straight.masks:
        assert torch.equal(cb_straight.masks[n], cb_resumed.masks[n])
        assert torch.equal(straight.get_parameter(n), resumed.get_parameter(n))
    assert all(NMStructure(2, 4).holds(cb_resumed.masks[n]) for n in STRUCTURED)


def test_changing_the_structure_on_resume_fails(tmp_path):
    make = lambda: SparsityCallback(Static(0.5, "uniform", structure="2:4"))  # noqa: E731
    straight_and_resumed(make, tmp_path, warns_at_half=False)
    L.seed_everything(0)
    cb = SparsityCallback(Static(0.75, "uniform", structure="1:4"))
    with pytest.raises(SparsityConfigError, match=r"Static.structure: was '2:4', now '1:4'"):
        trainer(max_epochs=4, callbacks=[cb]).fit(TinyNet(), random_loader(), ckpt_path=tmp_path / "last.ckpt")


# ---------------------------------------------------------------------------- SR-STE


class GradProbe(L.Callback):
    """Keeps the gradients as the optimizer sees them (after the SparsityCallback's hook), at step 0."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: pl_module.get_parameter(n).grad.clone() for n in STRUCTURED}
            self.weights = {n: pl_module.get_parameter(n).detach().clone() for n in STRUCTURED}


def test_srste_gradient_is_straight_through_plus_the_decay_of_pruned_weights():
    L.seed_everything(0)
    model, decay = TinyNet(), 0.01
    reference = TinyNet()
    reference.load_state_dict(model.state_dict())
    cb, probe = SparsityCallback(SRSTE("2:4", decay=decay, end=8)), GradProbe()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "structure=")
        trainer(max_steps=1, callbacks=[cb, probe]).fit(model, random_loader())
    # by hand: forward with w * mask (the N:M mask of |w| at fit start), gradient w.r.t. the masked weight
    masks = {n: NMStructure(2, 4).mask(reference.get_parameter(n).detach().abs()) for n in STRUCTURED}
    masked = {n: (reference.get_parameter(n).detach() * masks[n]).requires_grad_() for n in STRUCTURED}
    x, y = next(iter(random_loader()))
    reference.train()
    out = torch.func.functional_call(reference, masked, (x,))
    nn.functional.cross_entropy(out, y).backward()
    for n in STRUCTURED:
        w = probe.weights[n]
        expected = masked[n].grad + decay * w * ~masks[n]
        torch.testing.assert_close(probe.grads[n], expected, rtol=1e-5, atol=1e-7)
        assert (probe.grads[n][~masks[n]] != 0).any()  # pruned weights learn


def test_srste_keeps_dense_weights_until_end_then_is_exactly_n_m():
    model, cb, probe = fit(SRSTE("2:4", end=8))
    for n in STRUCTURED:
        w = model.get_parameter(n)
        assert (groups_of(w != 0, 4) <= 2).all() and ((w != 0) & ~cb.masks[n]).sum() == 0
    L.seed_everything(0)
    soft_model, soft_cb = TinyNet(), SparsityCallback(SRSTE("2:4", end=100))
    with pytest.warns(UserWarning):
        trainer(max_epochs=1, callbacks=[soft_cb]).fit(soft_model, random_loader())
    dense = soft_model.get_parameter("fc1.weight")
    assert int((dense != 0).sum()) == dense.numel()  # still soft: the pruned weights keep their values
    soft_model.eval()
    x = next(iter(random_loader()))[0]
    masked = {n: soft_model.get_parameter(n) * soft_cb.masks[n] for n in soft_cb.targets}
    expected = torch.func.functional_call(soft_model, masked, (x,))
    assert not torch.equal(expected, soft_model(x))  # outside a batch the model holds its dense weights


class ValidatedNet(TinyNet):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_srste_evaluation_sees_the_masked_weights():
    L.seed_everything(0)
    model, cb = ValidatedNet(), SparsityCallback(SRSTE("2:4", end=100))

    class Eval(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.weight = pl_module.fc1.weight.detach().clone()  # after the SparsityCallback's swap

    probe = Eval()
    with pytest.warns(UserWarning):
        trainer(max_epochs=1, callbacks=[cb, probe], limit_val_batches=1).fit(model, random_loader(), random_loader(32))
    assert torch.equal(probe.weight, model.fc1.weight.detach() * cb.masks["fc1.weight"])


# ------------------------------------------------------------------------------- IMP


@pytest.mark.parametrize("pruning", ["global", "layerwise"])
def test_imp_levels_end_n_m(pruning):
    s, g = NMStructure(2, 4), torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(16, 32, generator=g), "conv": torch.randn(8, 3, 3, 3, generator=g), "c": torch.randn(10, 16, generator=g)}
    masks = None
    for level in range(1, 5):  # density 0.8, 0.64, 0.512, then 2:4 (0.41 < 0.5)
        masks = imp_masks(weights, masks, level, 0.2, pruning, structure="2:4")
        for n in ("a", "c"):
            assert (s.group_counts(masks[n]) >= 2).all()
        assert masks["conv"].all()
    assert s.holds(masks["a"]) and s.holds(masks["c"])
    with pytest.raises(SparsityConfigError, match="counting='openlth' has no N:M structure"):
        imp_masks(weights, None, 1, 0.2, structure="2:4", counting="openlth")
