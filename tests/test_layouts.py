"""N:M groups run along each target's real input dim (issue 21, items 4 and 5).

Groups are counted here the obvious way, independent of the code under test: ``w.unfold(d, M, M)`` cuts the
input dim ``d`` into runs of ``M`` (dim 1 for Linear and convolutions: input channels at every kernel position;
dim 0 for Hugging Face ``Conv1D``, stored ``(in, out)``, and for ``ConvTranspose``, stored ``(in, out/g, *k)``).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from sparsetrain import SparsityCallback, SparsityConfigError, export
from sparsetrain.core.budgets import Budget
from sparsetrain.core.layouts import Layout, check_pieces, groupings, target_layouts
from sparsetrain.core.nm import NMStructure
from sparsetrain.core.shards import Piece
from sparsetrain.core.targets import select_targets
from sparsetrain.methods import GMP, RigL, Static
from sparsetrain.methods.base import SparsityContext
from tests.helpers import random_loader, trainer


class Conv1D(nn.Module):  # the shape of transformers.pytorch_utils.Conv1D: y = x @ W + b, W (in, out)
    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def input_groups(w: torch.Tensor, input_dim: int, m: int = 4) -> torch.Tensor:
    """Non-zeros of every run of ``m`` consecutive inputs along ``input_dim``, at every other index."""
    return (w.unfold(input_dim, m, m) != 0).sum(-1).reshape(-1)


LAYERS = {  # module, the dim of its weight that holds the inputs
    "linear": (nn.Linear(16, 6), 1),
    "hf_conv1d": (Conv1D(6, 16), 0),
    "conv1d": (nn.Conv1d(8, 4, 3), 1),
    "conv2d": (nn.Conv2d(8, 5, 3), 1),
    "conv3d": (nn.Conv3d(4, 3, 2), 1),
    "grouped_conv2d": (nn.Conv2d(16, 6, 3, groups=2), 1),
    "conv_transpose2d": (nn.ConvTranspose2d(8, 6, 2), 0),
    "grouped_conv_transpose2d": (nn.ConvTranspose2d(16, 6, 3, groups=2), 0),
    "conv_transpose1d": (nn.ConvTranspose1d(12, 3, 3, groups=3), 0),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_channel_groups_keep_the_n_largest_of_m_consecutive_inputs(kind):
    module, input_dim = LAYERS[kind]
    layout = target_layouts(module, {"w": module.weight})["w"]
    scores = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(0))
    mask = NMStructure(2, 4).on(layout.grouping(tuple(scores.shape))).mask(scores)
    assert (input_groups(mask, input_dim) == 2).all()
    kept = scores.masked_fill(~mask, float("inf")).unfold(input_dim, 4, 4).min(-1).values
    dropped = scores.masked_fill(mask, float("-inf")).unfold(input_dim, 4, 4).max(-1).values
    assert (kept > dropped).all()  # the kept ones are the largest of their group
    with torch.no_grad():
        module.weight.mul_(mask)
    assert export.is_n_m_sparse(module) and export.n_m_report(nn.Sequential(module))["0"]["n_m"]
    assert torch.equal(export.n_m_mask(module), mask)  # the export's own reading agrees


@pytest.mark.parametrize("nm_layout", ["channels", "flat"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_the_export_module_reads_every_layer_as_the_core_does(kind, nm_layout):
    """export's report names the reading the engine trained with, and agrees on which layers fit."""
    module, _ = LAYERS[kind]
    core = target_layouts(module, {"w": module.weight})["w"].grouping(tuple(module.weight.shape), nm_layout)
    report = export.n_m_report(nn.Sequential(module), nm_layout=nm_layout)["0"]
    assert (report["layout"], report["fits"]) == (core.name, core.fits(4))


def test_flat_is_the_old_reading_and_a_1x1_conv_reads_alike_in_both():
    scores = torch.rand(8, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    flat = NMStructure(2, 4).on(Layout("conv").grouping((8, 16, 3, 3), "flat"))
    assert torch.equal(flat.mask(scores), NMStructure(2, 4).mask(scores))  # sparsetrain <= 0.3's masks
    channels = NMStructure(2, 4).on(Layout("conv").grouping((8, 16, 3, 3)))
    assert not torch.equal(channels.mask(scores), flat.mask(scores))
    one = torch.rand(8, 16, 1, 1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(*(NMStructure(2, 4).on(Layout("conv").grouping((8, 16, 1, 1), k)).mask(one) for k in ("channels", "flat")))


def test_which_convs_fit_depends_on_the_layout_and_on_conv_groups():
    shapes = {"stem": (64, 3, 7, 7), "k2": (8, 2, 2, 2), "deep": (8, 16, 3, 3)}
    layouts = dict.fromkeys(shapes, Layout("conv"))
    fit = {k: {n for n, g in groupings(shapes, layouts, k).items() if g.fits(4)} for k in ("channels", "flat")}
    assert fit == {"channels": {"deep"}, "flat": {"k2", "deep"}}  # 2 input channels x 2 x 2: only flat runs of 4
    ct = {g: Layout("conv_transpose", groups=g).grouping((16, 3, 3, 3)) for g in (2, 8)}
    assert ct[2].fits(4) and not ct[8].fits(4)  # 16 input channels in 8 conv groups: 2 per group, a group of 4 would mix two


def test_target_layouts_follow_the_owning_module():
    model = nn.Sequential(nn.Linear(8, 8), Conv1D(4, 8), nn.Conv2d(4, 8, 3), nn.ConvTranspose2d(8, 4, 2, groups=2),
                          nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1)), nn.MultiheadAttention(8, 2))  # fmt: skip
    targets = select_targets(model, include="*.in_proj_weight")
    kinds = {n: (lay.kind, lay.groups) for n, lay in target_layouts(model, targets).items()}
    assert kinds == {
        "0.weight": ("linear", 1), "1.weight": ("hf_conv1d", 1), "2.weight": ("conv", 1), "3.weight": ("conv_transpose", 2),
        "4.parametrizations.weight.original1": ("conv", 1),  # weight norm's v: the conv's layout
        "5.in_proj_weight": ("rows", 1), "5.out_proj.weight": ("linear", 1),
    }  # fmt: skip


def test_a_shard_that_splits_groups_along_dim_0_fails_with_a_message():
    shapes = {"c_attn.weight": (32, 12), "fc.weight": (12, 32)}
    found = groupings(shapes, {"c_attn.weight": Layout("hf_conv1d"), "fc.weight": Layout("linear")})
    check_pieces(found, {"c_attn.weight": Piece((32, 12), 16, 32), "fc.weight": Piece((12, 32), 0, 5)}, shapes, 4)  # fine
    pieces = {"c_attn.weight": Piece((32, 12), 11, 22), "fc.weight": Piece((12, 32), 4, 8)}  # 3 ranks of 11 rows
    layouts = {"c_attn.weight": Layout("hf_conv1d"), "fc.weight": Layout("linear")}
    with pytest.raises(SparsityConfigError, match=r"c_attn.weight \(32, 12\) \(hf_conv1d \(in, out\): this rank holds dim-0 rows \[11, 22\)\).*multiple of 4 rows"):
        Budget("uniform", structure="2:4").structured(shapes, layouts, SimpleNamespace(pieces=pieces))  # what every method calls


# ----------------------------------------------------------------------------- real Trainers


class ConvNet(L.LightningModule):
    """Every kind of convolution on 1x8x8 inputs: 3x3, grouped 3x3, grouped transposed 2x2, 1x1, Conv1d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)  # 1 input channel: cannot hold 2:4 in either layout
        self.conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2)
        self.point = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.up(torch.relu(self.grouped(torch.relu(self.conv(x))))))
        x = torch.relu(self.point(x))
        return self.fc(torch.relu(self.seq(x.flatten(2))).flatten(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


INPUT_DIM = {"conv": 1, "grouped": 1, "up": 0, "point": 1, "seq": 1, "fc": 1}


def fit_convnet(method, steps=8):
    L.seed_everything(0)
    model, cb = ConvNet(), SparsityCallback(method, seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "structure=")  # the stem is reported as indivisible
        trainer(max_steps=steps, max_epochs=-1, callbacks=[cb]).fit(model, random_loader(n=8 * steps, batch_size=8))
    return model, cb


@pytest.mark.parametrize("method", [
    lambda: Static(0.5, "uniform", structure="2:4"),
    lambda: GMP(0.5, structure="2:4", start=0, end=6, every=2),
    lambda: RigL(0.5, "uniform", structure="2:4", every=2, drop_fraction=0.5, end=8),
])  # fmt: skip
def test_every_conv_kind_ends_2_4_along_its_input_channels_in_the_weights(method):
    model, cb = fit_convnet(method())
    for name, dim in INPUT_DIM.items():
        w, mask = model.get_submodule(name).weight.detach(), cb.masks[f"{name}.weight"]
        assert (input_groups(mask, dim) == 2).all(), name
        assert (input_groups(w, dim) <= 2).all() and ((w != 0) & ~mask).sum() == 0, name
    assert cb.masks["stem.weight"].all()  # indivisible='dense'
    report = export.n_m_report(model)
    assert {n: r["n_m"] for n, r in report.items()} == {"stem": False, **dict.fromkeys(INPUT_DIM, True)}
    assert report["up"]["layout"] == "conv_transpose channels" and report["conv"]["layout"] == "conv channels"


def test_nm_layout_flat_keeps_the_old_masks_and_is_not_hardware_2_4():
    _, flat = fit_convnet(Static(0.5, "uniform", structure="2:4", nm_layout="flat"), steps=1)
    assert (input_groups(flat.masks["conv.weight"].reshape(16, -1), 1) == 2).all()  # 2 of every 4 of in * kh * kw
    assert (input_groups(flat.masks["conv.weight"], 1) > 2).any()  # but not of every 4 input channels
    with pytest.raises(SparsityConfigError, match=r"nm_layout='rows' is unknown; allowed: channels, flat"):
        Static(0.5, "uniform", structure="2:4", nm_layout="rows")


def test_a_torchvision_resnet18_is_2_4_along_input_channels_by_default():
    """Issue 21, item 5, measured: with the old (flat) reading about a third of ResNet-18's channel groups break
    hardware 2:4; with the default none does (the masks of Static's init on the real model and its layouts)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    targets = select_targets(model)
    layouts = target_layouts(model, targets)
    convs = [n for n, lay in layouts.items() if lay.kind == "conv" and targets[n].shape[1] % 4 == 0]
    broken = {}
    for nm_layout in ("flat", "channels"):
        method = Static(0.5, "uniform", structure="2:4", nm_layout=nm_layout)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "structure=")  # conv1: 3 input channels
            masks = method.init_masks(SparsityContext(dict(targets), None, None, torch.Generator().manual_seed(0), layouts=layouts))
        counts = torch.cat([input_groups(masks[n], 1) for n in convs])
        broken[nm_layout] = (int((counts > 2).sum()), counts.numel())
    assert broken["channels"][0] == 0
    assert 0.25 < broken["flat"][0] / broken["flat"][1] < 0.4, broken  # ~31 % (issue 21)
