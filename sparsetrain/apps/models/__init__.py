"""Model factory: ``build_model(family, name, num_classes, in_chans, img_size, **kwargs)``.

Families:

* ``sparsetrain``: the in-repo nets in :data:`LOCAL_MODELS` (CIFAR ResNets, Wide ResNets and VGGs, LeNets,
  ``digits_cnn``, the MNIST-1D paper's ``mnist1d_mlp`` and ``mnist1d_cnn``).
* ``timm``: any ``timm.create_model`` name, ``pretrained=False`` by default. ``img_size``
  is passed to models that accept it (ViTs and other fixed-size models) and dropped for
  the rest (CNNs work at any size).
* ``torchvision``: ``torchvision.models.get_model(name, num_classes=..., weights=None)``.
  When ``in_chans != 3`` the first convolution is replaced by one with ``in_chans`` inputs
  (same shape otherwise, freshly initialised). With ``small_input`` (default: on for
  ``img_size <= 64``) a ResNet-family stem becomes a 3x3 stride-1 conv without max-pool,
  the usual CIFAR adaptation.
"""

from __future__ import annotations

import difflib
import re
from functools import partial

from torch import nn

from sparsetrain.apps.models.mnist1d import MNIST1DCNN, MNIST1DMLP
from sparsetrain.apps.models.small import CifarResNet, CifarVGG, CifarWideResNet, DigitsCNN, LeNet5, LeNet300100

LOCAL_MODELS = {
    "digits_cnn": DigitsCNN,
    "lenet300_100": LeNet300100,
    "lenet5": LeNet5,
    "mnist1d_mlp": MNIST1DMLP,
    "mnist1d_cnn": MNIST1DCNN,
    "resnet20": partial(CifarResNet, depth=20),
    "resnet32": partial(CifarResNet, depth=32),
    "resnet44": partial(CifarResNet, depth=44),
    "resnet56": partial(CifarResNet, depth=56),
    "resnet110": partial(CifarResNet, depth=110),
    "vgg11": partial(CifarVGG, depth=11),
    "vgg13": partial(CifarVGG, depth=13),
    "vgg16": partial(CifarVGG, depth=16),
    "vgg19": partial(CifarVGG, depth=19),
    "wrn22_2": partial(CifarWideResNet, depth=22, width=2),
    "wrn28_10": partial(CifarWideResNet, depth=28, width=10),
}
FAMILIES = ("sparsetrain", "timm", "torchvision")


def _close(name: str, names: list[str], n: int = 8) -> str:
    return ", ".join(difflib.get_close_matches(name, names, n=n, cutoff=0.5)) or "none"


def build_model(
    name: str,
    family: str = "sparsetrain",
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int = 32,
    **kwargs,
) -> nn.Module:
    """Build a classifier by family and name; see the module docstring."""
    if family == "sparsetrain":
        if name not in LOCAL_MODELS:
            raise ValueError(
                f"model.name={name!r} is not an in-repo model; valid choices: {', '.join(LOCAL_MODELS)}. "
                "For other architectures use model=timm or model=torchvision with model.name=<name>."
            )
        return LOCAL_MODELS[name](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    if family == "timm":
        return _timm_model(name, num_classes, in_chans, img_size, **kwargs)
    if family == "torchvision":
        return _torchvision_model(name, num_classes, in_chans, img_size, **kwargs)
    raise ValueError(f"model.family={family!r} is unknown; valid choices: {', '.join(FAMILIES)}")


def _timm_model(name: str, num_classes: int, in_chans: int, img_size: int, pretrained: bool = False, **kwargs):
    import timm

    if not timm.is_model(name):
        pattern = (re.match(r"[A-Za-z]+", name) or re.match(".*", name)).group(0)
        raise ValueError(
            f"model.name={name!r} is not a timm model. Close names: {_close(name, timm.list_models())}. "
            f"List candidates with timm.list_models('*{pattern}*') "
            f"(e.g. {', '.join(timm.list_models(f'*{pattern}*')[:8]) or 'no match'})."
        )
    args = dict(pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **args)
        except TypeError as err:  # a model that takes any input size (most CNNs) has no img_size argument
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **args)


def _torchvision_model(
    name: str, num_classes: int, in_chans: int, img_size: int, small_input: bool | None = None, **kwargs
):
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise ValueError(
            f"model.name={name!r} is not a torchvision classification model. Close names: {_close(name, valid)}. "
            "All names: torchvision.models.list_models(module=torchvision.models)."
        )
    model = torchvision.models.get_model(name, num_classes=num_classes, weights=None, **kwargs)
    is_resnet = isinstance(getattr(model, "conv1", None), nn.Conv2d) and isinstance(
        getattr(model, "maxpool", None), nn.Module
    )
    if small_input is None:
        small_input = img_size is not None and img_size <= 64 and is_resnet
    if small_input:
        if not is_resnet:
            raise ValueError(
                f"model.small_input=true adapts the stem of ResNet-family models (conv1 + maxpool); "
                f"{name!r} has no such stem. Set model.small_input=false."
            )
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        _replace_first_conv(model, in_chans)
    return model


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first Conv2d (in module order) for one with ``in_chans`` inputs, otherwise the same."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            new = nn.Conv2d(
                in_chans,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                bias=conv.bias is not None,
            )
            setattr(model.get_submodule(parent_name), attr, new)
            return
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to in_chans={in_chans}")


__all__ = ["FAMILIES", "LOCAL_MODELS", "build_model", "CifarResNet", "CifarVGG", "CifarWideResNet", "DigitsCNN", "LeNet5", "LeNet300100",
           "MNIST1DCNN", "MNIST1DMLP"]
