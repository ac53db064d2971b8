"""``WeightsFrom``: start a fit from the weights of another run (fine-tuning), not a resume."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class WeightsFrom(Callback):
    """Load the model weights of a checkpoint at the start of a fit; nothing else is taken.

    Unlike ``trainer.fit(..., ckpt_path=...)`` (a resume: optimizer, schedules, step counter,
    callback states and masks continue), this only copies the ``state_dict`` of a Lightning
    checkpoint (or a plain ``torch.save``\\ d state dict) into the LightningModule, in ``setup``,
    so that a new run, e.g. with another sparsity method, fine-tunes from it. It runs before
    every callback's ``on_fit_start``, so a :class:`~sparsetrain.SparsityCallback` sees the
    loaded weights when it chooses its masks. When the fit is itself a resume (``ckpt_path``
    given), Lightning restores that checkpoint after ``setup``, so the resumed weights win.

    Args:
        path: checkpoint file; ``None`` does nothing.
        strict: passed to ``load_state_dict``.

    Example (Hydra: ``configs/experiment/annealing_digits.yaml`` sets ``weights_from``)::

        trainer = L.Trainer(callbacks=[WeightsFrom("dense/checkpoints/last.ckpt"),
                                       SparsityCallback(StochasticAnnealing(0.95))])
    """

    def __init__(self, path: str | Path | None, strict: bool = True):
        self.path = None if path is None else Path(path)
        self.strict = strict
        if self.path is not None and not self.path.is_file():
            raise FileNotFoundError(
                f"weights_from={str(path)!r}: no such file (expected a checkpoint, e.g. <run>/checkpoints/last.ckpt)"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.path is None:
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        pl_module.load_state_dict(state, strict=self.strict)
        log.info("loaded the weights of %s", self.path)
