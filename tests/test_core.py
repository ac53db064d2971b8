"""Pure-tensor tests of sparsetrain.core: schedules, budgets, masks, targets, reports."""

import math

import pytest
import torch
import torchvision
from torch import nn

from sparsetrain.core import (
    SparsityConfigError,
    apply_masks_,
    budget_masks,
    cosine_decay,
    global_topk_masks,
    is_update_step,
    layer_counts,
    layer_densities,
    magnitude_scores,
    random_scores,
    reset_optimizer_state_,
    resolve_step,
    scheduled_sparsity,
    select_targets,
    sparsity_report,
)

SHAPES = {
    "conv1.weight": (16, 3, 3, 3),
    "conv2.weight": (32, 16, 3, 3),
    "conv3.weight": (64, 32, 3, 3),
    "fc.weight": (10, 64),
}


# ------------------------------------------------------------------ schedules
def test_cubic_schedule_edges_and_midpoint():
    s = lambda t: scheduled_sparsity(t, 0.0, 0.9, start=100, end=300)  # noqa: E731
    assert s(0) == 0.0 and s(100) == 0.0
    assert s(200) == pytest.approx(0.9 + (0.0 - 0.9) * 0.5**3)  # = 0.7875
    assert s(300) == 0.9  # exactly the final value
    assert s(10_000) == 0.9
    assert scheduled_sparsity(150, 0.5, 0.9, 100, 300) == pytest.approx(0.9 - 0.4 * 0.75**3)


def test_linear_and_constant_schedules():
    assert scheduled_sparsity(50, 0.0, 0.8, 0, 100, "linear") == pytest.approx(0.4)
    assert scheduled_sparsity(0, 0.0, 0.8, 0, 100, "constant") == 0.8
    with pytest.raises(SparsityConfigError, match="schedule='exp'.*cubic"):
        scheduled_sparsity(0, 0.0, 0.8, 0, 100, "exp")


def test_update_steps_land_on_end():
    steps = [t for t in range(0, 200) if is_update_step(t, start=10, end=95, every=20)]
    assert steps == [10, 30, 50, 70, 90, 95]


def test_resolve_step_ints_fractions_and_errors():
    assert resolve_step(7, 100, "end") == 7
    assert resolve_step(0.75, 1000, "end") == 750
    assert resolve_step(1.0, 333, "end") == 333
    assert resolve_step(0.0, None, "start") == 0
    with pytest.raises(SparsityConfigError, match="end=1.5"):
        resolve_step(1.5, 100, "end")
    with pytest.raises(SparsityConfigError, match="start=-1"):
        resolve_step(-1, 100, "start")
    with pytest.raises(SparsityConfigError, match="length of training is unknown"):
        resolve_step(0.5, None, "end")
    with pytest.raises(SparsityConfigError, match="every=True"):
        resolve_step(True, 100, "every")


def test_cosine_decay():
    assert cosine_decay(0, 0.3, 100) == 0.3
    assert cosine_decay(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_decay(100, 0.3, 100) == 0.0


# -------------------------------------------------------------------- budgets
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("distribution", ["uniform", "erk", "er"])
def test_budget_identity_and_bounds(distribution, sparsity):
    shapes = {**SHAPES, "wide.weight": (512, 256)}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    dens = layer_densities(shapes, sparsity, distribution)
    assert max(dens.values()) <= 1.0
    assert sum(dens[n] * sizes[n] for n in shapes) == pytest.approx((1 - sparsity) * sum(sizes.values()))
    counts = layer_counts(shapes, sparsity, distribution)
    assert sum(counts.values()) == round((1 - sparsity) * sum(sizes.values()))
    for n in shapes:
        assert abs(counts[n] - dens[n] * sizes[n]) <= 1.0
        assert 0 <= counts[n] <= sizes[n]


def test_erk_raw_scores_follow_shapes():
    dens = layer_densities({"a": (64, 32, 3, 3), "b": (128, 64, 3, 3)}, 0.99, "erk")
    ratio = ((64 + 32 + 3 + 3) / (64 * 32 * 9)) / ((128 + 64 + 3 + 3) / (128 * 64 * 9))
    assert dens["a"] / dens["b"] == pytest.approx(ratio)
    er = layer_densities({"a": (64, 32, 3, 3), "b": (128, 64, 3, 3)}, 0.99, "er")
    assert er["a"] / er["b"] == pytest.approx(((64 + 32) / (64 * 32)) / ((128 + 64) / (128 * 64)))


def test_erk_makes_small_layers_dense_and_redistributes():
    shapes = {"tiny.weight": (4, 1, 3, 3), "big.weight": (256, 256, 3, 3)}
    dens = layer_densities(shapes, 0.8, "erk")
    assert dens["tiny.weight"] == 1.0  # raw ERK would give it a density > 1
    n_big = 256 * 256 * 9
    expected_big = (0.2 * (36 + n_big) - 36) / n_big
    assert dens["big.weight"] == pytest.approx(expected_big)


def test_overrides_fix_a_layer_and_others_share_the_rest():
    sizes = {n: math.prod(s) for n, s in SHAPES.items()}
    dens = layer_densities(SHAPES, 0.9, "uniform", overrides={"fc.*": 0.5})
    assert dens["fc.weight"] == 0.5
    assert sum(dens[n] * sizes[n] for n in SHAPES) == pytest.approx(0.1 * sum(sizes.values()))
    assert len({round(dens[n], 12) for n in SHAPES if n != "fc.weight"}) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity=1.0 must be a number in \\[0, 1\\)"),
        (dict(sparsity=-0.1), "sparsity=-0.1"),
        (dict(sparsity=0.9, distribution="lognormal"), "distribution='lognormal' is unknown; allowed: uniform, erk, er"),
        (dict(sparsity=0.9, overrides={"fc.weight": 1.5}), "overrides\\['fc.weight'\\]=1.5"),
        (dict(sparsity=0.9, overrides={"nothing.*": 0.5}), "overrides key 'nothing.\\*' matches no target"),
        (dict(sparsity=0.1, overrides={"conv3.weight": 0.99}), "cannot hold|does not fit"),
    ],
)
def test_budget_errors_name_key_and_value(kwargs, match):
    with pytest.raises(SparsityConfigError, match=match):
        layer_densities(SHAPES, **kwargs)


# ---------------------------------------------------------------------- masks
def test_global_topk_keeps_largest_magnitudes_across_layers():
    a = torch.tensor([[0.1, -5.0], [0.3, 0.2]])
    b = torch.tensor([4.0, -0.05, 3.0, 0.4])
    masks = global_topk_masks(magnitude_scores({"a": a, "b": b}), keep=3)
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, True, False]


def test_global_budget_masks_keep_the_threshold_set():
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    masks = budget_masks(magnitude_scores(params), 0.9, "global")
    total = sum(p.numel() for p in params.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.1 * total)
    smallest_kept = min(p[m].abs().min() for p, m in zip(params.values(), masks.values()) if m.any())
    largest_dropped = max(p[~m].abs().max() for p, m in zip(params.values(), masks.values()))
    assert smallest_kept > largest_dropped


def test_masked_positions_are_never_kept_again():
    w = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    old = torch.tensor([False, True, True, True, True])
    masks = budget_masks(magnitude_scores({"w": w}, {"w": old}), 0.6, "uniform")
    assert masks["w"].tolist() == [False, True, True, False, False]


def test_random_budget_masks_exact_counts_and_seeded():
    params = {n: torch.empty(s) for n, s in SHAPES.items()}
    counts = layer_counts(SHAPES, 0.9, "erk")
    m1 = budget_masks(random_scores(params, torch.Generator().manual_seed(3)), 0.9, "erk")
    m2 = budget_masks(random_scores(params, torch.Generator().manual_seed(3)), 0.9, "erk")
    m3 = budget_masks(random_scores(params, torch.Generator().manual_seed(4)), 0.9, "erk")
    assert {n: int(m.sum()) for n, m in m1.items()} == counts
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    assert not all(torch.equal(m1[n], m3[n]) for n in m1)


def test_apply_masks_zeroes_exactly_and_skips_none():
    w = [torch.randn(4, 4), torch.randn(3)]
    masks = [torch.rand(4, 4) > 0.5, torch.tensor([True, False, True])]
    kept = [t.clone() for t in w]
    apply_masks_(w + [None], masks + [torch.ones(2, dtype=torch.bool)])
    for t, m, k in zip(w, masks, kept):
        assert torch.equal(t[~m], torch.zeros(int((~m).sum())))
        assert torch.equal(t[m], k[m])


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw", "rmsprop"])
def test_reset_optimizer_state_zeroes_every_param_shaped_state(opt):
    p = nn.Parameter(torch.randn(6, 5))
    optimizer = {
        "sgd": lambda: torch.optim.SGD([p], lr=0.1, momentum=0.9),
        "adam": lambda: torch.optim.Adam([p]),
        "adamw": lambda: torch.optim.AdamW([p]),
        "rmsprop": lambda: torch.optim.RMSprop([p], momentum=0.9),
    }[opt]()
    p.grad = torch.randn_like(p)
    optimizer.step()
    keep = torch.rand(6, 5) > 0.5
    touched = reset_optimizer_state_(optimizer, [p], [keep])
    shaped = [v for v in optimizer.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
    assert touched == len(shaped) >= 1
    for v in shaped:
        assert (v[~keep] == 0).all() and (v[keep] != 0).any()


# -------------------------------------------------------------------- targets
class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.head.weight = self.fc.weight  # one parameter, two modules


def test_default_targets_are_conv_and_linear_weights_shared_once():
    targets = select_targets(SharedNet())
    assert list(targets) == ["conv.weight", "fc.weight"]


def test_include_exclude_first_last():
    net = SharedNet()
    assert list(select_targets(net, include="embed.*")) == ["embed.weight", "conv.weight", "fc.weight"]
    assert list(select_targets(net, exclude=["fc.*"])) == ["conv.weight"]
    assert list(select_targets(net, dense_first=True)) == ["fc.weight"]
    assert list(select_targets(net, dense_last=True)) == ["conv.weight"]


def test_torchvision_resnet_targets_and_compile_names():
    model = torchvision.models.resnet18(num_classes=10)
    targets = select_targets(model)
    assert len(targets) == 21 and "conv1.weight" in targets and "fc.weight" in targets
    assert not any("bn" in n or n.endswith("bias") for n in targets)
    compiled = torch.compile(model)
    assert list(select_targets(compiled)) == list(targets)  # "_orig_mod." is dropped from names


def test_target_errors():
    with pytest.raises(SparsityConfigError, match="include='nope.\\*' matches no parameter"):
        select_targets(SharedNet(), include="nope.*")
    with pytest.raises(SparsityConfigError, match="has no prunable weights"):
        select_targets(nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4)))


def test_report_counts_zeros_from_tensors():
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    v = torch.tensor([0.0, -0.0, 3.0])
    report = sparsity_report({"w": w, "v": v})
    assert report.layers["w"].zeros == 2 and report.layers["v"].zeros == 2
    assert report.global_sparsity == pytest.approx(4 / 7)
    assert report.metrics()["sparsity/layer/v"] == pytest.approx(2 / 3)
    assert "global" in report.table()
