"""Rewinding for lottery tickets: the callbacks that save a level-0 rewind point and start each level from it.

:class:`SaveRewindPoint` writes the full training state right after optimizer step ``k``;
:class:`LevelStart` loads learning-rate-rewinding weights, resets the optimizer state that a level
must not inherit, and skips the batches of the current epoch that the rewind point had trained on;
:class:`SkipFirst` is the sampler wrapper that does the skipping. Used by
:class:`sparsetrain.apps.lottery.Lottery`.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from sparsetrain.callback import SparsityCallback
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import reset_optimizer_state_
from sparsetrain.core.schedules import resolve_step


class SaveRewindPoint(Callback):
    """Level 0: write the full training state right after optimizer step ``k`` (``k = 0``: at train start)."""

    def __init__(self, rewind, path: Path):
        self.rewind, self.path, self.step, self.saved = rewind, Path(path), None, False

    def on_fit_start(self, trainer, pl_module):
        total = trainer.estimated_stepping_batches
        self.step = resolve_step(self.rewind, total if math.isfinite(total) else None, "lottery.rewind")
        if self.step >= total:
            raise SparsityConfigError(
                f"lottery.rewind={self.rewind!r} is step {self.step}, but training has only {int(total)} optimizer "
                f"steps; allowed: an int in [0, {int(total)}) or a float fraction of training in [0, 1)"
            )

    def on_train_start(self, trainer, pl_module):
        if self.step == trainer.global_step == 0:
            self._save(trainer)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not self.saved:
            self._save(trainer)

    def _save(self, trainer):
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp)  # every rank calls it (it has a barrier); rank 0 writes
        if trainer.is_global_zero:
            ckpt = torch.load(tmp, map_location="cpu", weights_only=False)
            ckpt["callbacks"] = {}  # no masks, no best-checkpoint bookkeeping: each level brings its own
            torch.save(ckpt, tmp)
            os.replace(tmp, self.path)
        self.saved = True


class LevelStart(Callback):
    """Before a level trains: load LR-rewinding weights, zero the optimizer state of pruned weights,
    and skip the batches of the current epoch that the restored checkpoint had already trained on."""

    def __init__(self, sparsity: SparsityCallback, weights: dict | None, fresh: bool, fresh_optimizer: bool = False):
        self.sparsity, self.weights, self.fresh, self.fresh_optimizer = sparsity, weights, fresh, fresh_optimizer

    def on_fit_start(self, trainer, pl_module):  # after the checkpoint's weights, before the masks are applied
        if self.weights is not None:
            pl_module.load_state_dict(self.weights)

    def on_train_start(self, trainer, pl_module):  # after the optimizer and loop state are restored
        if self.fresh_optimizer:  # OpenLTH: a new optimizer per level (LR schedule and step stay at k)
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        if self.fresh and self.sparsity.masks is not None:
            for optimizer in trainer.optimizers:
                reset_optimizer_state_(optimizer, self.sparsity.targets.values(), self.sparsity.masks.values())
        if trainer.global_step == 0 or not math.isfinite(trainer.num_training_batches):
            return
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        done = (trainer.global_step - trainer.current_epoch * per_epoch) * trainer.accumulate_grad_batches
        loader = trainer.train_dataloader
        batches = getattr(loader, "batch_sampler", None)
        if not hasattr(batches, "sampler"):
            warnings.warn(
                "cannot restore the data position of the rewind point: the train loader has no batch "
                "sampler; the resumed epoch restarts from its first batch",
                stacklevel=2,
            )
            return
        # Lightning starts the loader's iterator before it sets the sampler's epoch; with worker processes
        # they have already drawn indices, so set the epoch and restart them (the order is seed + epoch)
        if hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(trainer.current_epoch)
        batches.sampler = SkipFirst(batches.sampler, max(done, 0) * batches.batch_size)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if getattr(loader, "num_workers", 0) and fetcher is not None:
            iter(fetcher)


class SkipFirst(torch.utils.data.Sampler):
    """Wraps a sampler; its next iteration (only) skips the first ``n`` indices."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        n, self.n = self.n, 0
        return itertools.islice(iter(self.sampler), n, None)
