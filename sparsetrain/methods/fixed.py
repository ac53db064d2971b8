"""Fixed masks: hold given masks for a whole fit (the retraining step of lottery tickets / IMP).

The masks are computed elsewhere (e.g. by :func:`sparsetrain.core.imp.imp_masks` from the
previous level's trained weights); this method only hands them to the callback at fit start,
which zeroes the pruned weights and keeps them (and their gradients) at zero every step.
The level-by-level driver is :class:`sparsetrain.apps.lottery.Lottery`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks
from sparsetrain.methods.base import SparsityContext, SparsityMethod, register_method


@register_method("fixed", supports=("sharding",))
class FixedMasks(SparsityMethod):
    """Train with ``masks`` held fixed; ``None`` trains dense.

    Args:
        masks: ``{target name: bool tensor}`` for every target of the callback, or the path of
            a file written with ``torch.save`` (e.g. a lottery level's ``masks.pt``).

    On a resume (``trainer.fit(..., ckpt_path=...)``) the masks stored in the checkpoint win.

    Example::

        masks = torch.load("outputs/lottery/<run>/level_05/masks.pt")
        trainer = L.Trainer(max_epochs=10, callbacks=[SparsityCallback(FixedMasks(masks))])
        trainer.fit(model, datamodule)
    """

    def __init__(self, masks: Mapping[str, Tensor] | str | Path | None = None):
        if isinstance(masks, (str, Path)):
            masks = torch.load(masks, map_location="cpu", weights_only=True)
        self.masks: Masks | None = None if masks is None else {n: m.detach().to("cpu", torch.bool) for n, m in masks.items()}
        total = sum(m.numel() for m in (self.masks or {}).values())
        self.sparsity = 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0

    def init_masks(self, ctx: SparsityContext) -> Masks | None:
        if self.masks is None:
            return None
        shapes = ctx.shapes
        if list(self.masks) != list(shapes) or any(tuple(self.masks[n].shape) != s for n, s in shapes.items()):
            raise SparsityConfigError(
                f"FixedMasks has masks for {[(n, tuple(m.shape)) for n, m in self.masks.items()][:4]}... but the "
                f"callback's targets are {list(shapes.items())[:4]}...; use the same "
                "model and the same include/exclude/dense_first/dense_last as when the masks were made"
            )
        if ctx.shards is None:
            return dict(self.masks)
        pieces = ctx.shards.pieces  # under FSDP2 each rank keeps the rows of its shard
        return {n: m[pieces[n].start : pieces[n].stop] for n, m in self.masks.items()}

    def hparams(self) -> dict:
        """Nothing to compare on resume: the masks are data, and the checkpoint's masks win."""
        return {}

    def __repr__(self) -> str:
        layers = len(self.masks) if self.masks is not None else 0
        return f"FixedMasks(density={1 - self.sparsity:.4f}, layers={layers})"
