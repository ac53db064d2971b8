"""Default targets: transposed convolutions, parametrized weights, weight-standardised convs."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils.data import DataLoader, TensorDataset

from sparsetrain import SparsityCallback
from sparsetrain.core import select_targets
from sparsetrain.methods import GMP


def old_style(fn, module: nn.Module) -> nn.Module:
    """``torch.nn.utils.weight_norm`` / ``spectral_norm`` (hook-based, deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(module)


def no_warnings(model: nn.Module, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return select_targets(model, **kwargs)


def one_warning(model: nn.Module, **kwargs) -> tuple[dict, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        targets = select_targets(model, **kwargs)
    assert [w.category for w in caught] == [UserWarning], [str(w.message) for w in caught]
    return targets, str(caught[0].message)


def row_mask(shape: tuple[int, ...], zeros_per_row: int, seed: int = 0) -> torch.Tensor:
    """``zeros_per_row`` zeros at random in every row (so no row is all zero)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    order = torch.stack([torch.randperm(cols, generator=g) for _ in range(rows)])
    return (order >= zeros_per_row).float().view(shape)


# ------------------------------------------------------------ transposed convolutions
def test_conv_transpose_weights_are_default_targets():
    net = nn.Sequential(
        nn.ConvTranspose1d(4, 6, 3),
        nn.ConvTranspose2d(6, 8, 3, groups=2),
        nn.ConvTranspose3d(8, 2, 2, bias=False),
    )
    targets = no_warnings(net)
    assert list(targets) == ["0.weight", "1.weight", "2.weight"]
    assert [tuple(p.shape) for p in targets.values()] == [(4, 6, 3), (6, 4, 3, 3), (8, 2, 2, 2, 2)]
    assert all(p is net.get_parameter(n) for n, p in targets.items())


# ------------------------------------------------------------------ weight norm, spectral norm
class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.new = parametrizations.weight_norm(nn.Linear(20, 10))
        self.old = old_style(nn.utils.weight_norm, nn.Conv1d(10, 6, 5))
        self.spec = parametrizations.spectral_norm(nn.Linear(10, 8))
        self.spec_old = old_style(nn.utils.spectral_norm, nn.Linear(8, 4))
        self.plain = nn.Linear(4, 3)


def test_weight_norm_and_spectral_norm_target_the_stored_zero_keeping_parameter(caplog):
    net = NormNet()
    with caplog.at_level(logging.INFO, logger="sparsetrain.core.targets"):
        targets = no_warnings(net)
    assert list(targets) == [
        "new.parametrizations.weight.original1",
        "old.weight_v",
        "spec.parametrizations.weight.original",
        "spec_old.weight_orig",
        "plain.weight",
    ]
    assert targets["new.parametrizations.weight.original1"].shape == (10, 20)
    assert targets["old.weight_v"].shape == (6, 10, 5)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4 and all("keeps zeros" in m for m in logged)
    assert "'new.parametrizations.weight.original1'" in logged[0] and "_WeightNorm" in logged[0]
    assert "'old.weight_v'" in logged[1] and "WeightNorm" in logged[1]


@pytest.mark.parametrize("layer", ["new", "old", "spec", "spec_old"])
def test_zeros_in_the_target_are_zeros_in_the_forward_weight(layer):
    net = NormNet()
    (name,) = [n for n in select_targets(net) if n.startswith(layer + ".")]
    target, module = net.get_parameter(name), net.get_submodule(layer)
    assert (target != 0).all() and (module.weight != 0).all()
    cols = target[0].numel()
    mask = row_mask(target.shape, int(0.7 * cols))
    with torch.no_grad():
        target.mul_(mask)
    net.train()
    x = torch.randn(2, module.in_features) if isinstance(module, nn.Linear) else torch.randn(2, 10, 7)
    module(x)  # the hook-based norms recompute module.weight in the forward
    weight = module.weight  # parametrized: recomputed from the stored parameters
    pruned = int((mask == 0).sum())
    assert pruned == target.shape[0] * int(0.7 * cols)
    assert int((weight == 0).sum()) == pruned
    assert torch.equal(weight == 0, mask == 0)
    assert torch.isfinite(weight).all()


# ------------------------------------------------------------ end to end, with a Trainer
class WeightNormNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.wn = parametrizations.weight_norm(nn.Linear(32, 16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.wn(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_gmp_trains_a_weight_norm_layer_sparse_end_to_end():
    torch.manual_seed(0)
    model = WeightNormNet()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 32, generator=g), torch.randint(0, 4, (96,), generator=g))
    cb = SparsityCallback(GMP(sparsity=0.8, start=0, end=4, every=1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    v_name = "wn.parametrizations.weight.original1"
    assert list(cb.targets) == [v_name, "fc.weight"]
    pruned = int((~cb.masks[v_name]).sum())
    assert abs(pruned - 0.8 * 16 * 32) < 1
    v = model.get_parameter(v_name)
    weight = model.wn.weight  # what the forward uses, recomputed from g and v
    assert int((v == 0).sum()) == pruned
    assert int((weight == 0).sum()) == pruned
    assert torch.equal(weight == 0, ~cb.masks[v_name])
    assert torch.isfinite(weight).all()
    assert int((model.fc.weight == 0).sum()) == int((~cb.masks["fc.weight"]).sum()) > 0


# ----------------------------------------------------------- other parametrizations
class Double(nn.Module):
    def forward(self, w):
        return 2 * w


class OrthoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.ortho = parametrizations.orthogonal(nn.Linear(6, 6))
        self.user = nn.Linear(6, 6)
        parametrize.register_parametrization(self.user, "weight", Double())
        self.chain = parametrizations.weight_norm(nn.Linear(6, 6))
        parametrize.register_parametrization(self.chain, "weight", Double())
        self.plain = nn.Linear(6, 2)


def test_other_parametrizations_are_not_targets_and_warn_once_naming_them():
    net = OrthoNet()
    targets, message = one_warning(net)
    assert list(targets) == ["plain.weight"]
    assert "3 layer(s) are not sparse targets" in message
    assert "ortho (parametrization _Orthogonal)" in message
    assert "user (parametrization Double)" in message
    assert "chain (parametrization _WeightNorm -> Double)" in message
    assert "remove_parametrizations" in message and "`include`" in message


def test_a_stored_parameter_named_by_include_is_a_target_and_silences_its_layer():
    net = OrthoNet()
    targets, message = one_warning(net, include="ortho.parametrizations.weight.original")
    assert list(targets) == ["ortho.parametrizations.weight.original", "plain.weight"]
    assert "ortho" not in message and "2 layer(s)" in message
    targets = no_warnings(net, include="ortho.parametrizations.weight.original", exclude=["user.*", "chain.*"])
    assert list(targets) == ["ortho.parametrizations.weight.original", "plain.weight"]


def test_a_weight_computed_by_another_hook_is_not_a_target_and_warns():
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.5)  # weight = weight_orig * weight_mask
    targets, message = one_warning(net)
    assert list(targets) == ["1.weight"]
    assert "1 layer(s) are not sparse targets" in message
    assert "0 (weight not a stored parameter (forward pre-hooks: L1Unstructured))" in message
    assert list(no_warnings(net, include="0.weight_orig")) == ["0.weight_orig", "1.weight"]


# --------------------------------------------------------- weight-standardised convolutions
def std_conv_net():
    timm_layers = pytest.importorskip("timm.layers")
    return nn.Sequential(
        timm_layers.StdConv2d(3, 8, 3),
        nn.Conv2d(8, 8, 3),
        timm_layers.ScaledStdConv2d(8, 8, 3),
        nn.Flatten(),
        nn.LazyLinear(4),
    )


def test_weight_standardised_convs_are_not_default_targets_and_warn():
    net = std_conv_net()
    targets, message = one_warning(net)
    assert list(targets) == ["1.weight", "4.weight"]
    assert "2 weight-standardised convolution(s) are not sparse targets: 0 (StdConv2d), 2 (ScaledStdConv2d)" in message
    assert "zeros in the stored weight are not zeros in the forward" in message
    assert "`include=` can still add them" in message


def test_weight_standardised_convs_named_by_include_are_targets_and_still_warn():
    net = std_conv_net()
    targets, message = one_warning(net, include="0.weight")
    assert list(targets) == ["0.weight", "1.weight", "4.weight"]
    assert "selected by include: 0 (StdConv2d)" in message and "not sparse targets: 2 (ScaledStdConv2d)" in message
    targets, message = one_warning(net, include=["0.weight", "2.weight"])
    assert list(targets) == ["0.weight", "1.weight", "2.weight", "4.weight"]
    assert message.startswith(
        "Weight-standardised convolution(s) selected by include: 0 (StdConv2d), 2 (ScaledStdConv2d)"
    )
    assert list(no_warnings(net, exclude=["0.*", "2.*"])) == ["1.weight", "4.weight"]


def test_weight_standardised_subclass_is_found_by_class_name():
    timm_layers = pytest.importorskip("timm.layers")

    class MyStdConv(timm_layers.StdConv2dSame):
        pass

    net = nn.Sequential(MyStdConv(3, 4, 3), nn.Linear(4, 2))
    targets, message = one_warning(net)
    assert list(targets) == ["1.weight"] and "0 (MyStdConv)" in message
