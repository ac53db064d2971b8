"""``SparsityCallback``: runs a sparsity method inside a Lightning ``Trainer``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.kernels import MaskKernel
from sparsetrain.core.masks import Masks, keeps_masked_weights_zero, reset_optimizer_state_
from sparsetrain.core.report import SparsityReport, sparsity_report
from sparsetrain.core.stochastic import ParameterSwap, StochasticKernel, derive_seed
from sparsetrain.core.targets import select_targets
from sparsetrain.methods.base import SparsityContext, SparsityMethod

log = logging.getLogger(__name__)


class SparsityCallback(Callback):
    """Make a model sparse while it trains.

    At fit start the callback picks the prunable weights (see
    :func:`sparsetrain.core.select_targets`) and asks ``method`` for masks. Then, every
    optimizer step:

    1. ``on_before_optimizer_step`` (after AMP unscaling, before gradient clipping): copy the
       dense gradients if the method's next update needs them, then zero the gradients of
       masked weights;
    2. after the step (``on_train_batch_end``): multiply the weights by their masks in one
       fused pass; on an update step ask the method for new masks, zero newly pruned weights
       and the optimizer state (momentum, Adam moments) of every position whose mask changed.

    With ``reapply="auto"`` the per-step multiply of the weights is skipped when every
    optimizer is a plain ``SGD``, ``Adam``, ``AdamW``, ``NAdam``, ``RAdam``, ``Adamax``,
    ``Adagrad``, ``RMSprop`` or ``Adadelta``: with a zero gradient and zero state their step
    leaves a zero weight exactly zero (weight decay included), so masking the gradients is
    the only per-step pass over the weights. Masks are still applied to the weights at fit
    start, at every update and at the end of every epoch. ``reapply="always"`` multiplies
    after every step (use it with other optimizers or callbacks that write the weights).

    Stochastic masks (:class:`~sparsetrain.methods.StochasticAnnealing`): while
    ``method.stochastic(step)`` is true the weights and gradients are *not* multiplied by the
    masks. Instead, at ``on_train_batch_start`` the callback samples ``w * (mask | (u < p))``
    for every target (see :mod:`sparsetrain.core.stochastic`; ``u`` from a generator seeded with
    ``(seed, step, batch_idx, target)``, identical on every rank, global RNG untouched) and puts
    these tensors in place of the parameters inside their modules (``module._parameters``,
    no hooks, no renaming); ``on_after_backward`` puts the parameters back, so autograd has given
    each parameter ``grad * sampled_mask``. Evaluation batches (validation, test, predict) get
    ``w * mask`` the same way. Optimizer state is reset only when masks become hard: at the
    method's last update the excluded weights and their state are zeroed, and from then on the
    masks are hard as for every other method. Outside a batch the model holds its parameters:
    state-dict keys, ``deepcopy`` and pickling are unaffected.

    Sparsity counted from the weights (``sparsity/global``, ``sparsity/layer/<name>``) and the
    method's target (``sparsity/target``) go to the Trainer's loggers after every update and
    at the end of every training epoch. Masks, method state, RNG state and the step counter
    are saved in Lightning checkpoints, so ``trainer.fit(..., ckpt_path=...)`` resumes with
    the same masks and schedule. Under DDP all ranks decide from the same all-reduced
    gradients and identical weights with an identically seeded generator; after every update
    the callback checks that the masks agree on every rank and raises if they do not.

    Args:
        method: a :class:`~sparsetrain.methods.base.SparsityMethod` (``GMP``, ``Static``, ...).
        include, exclude: globs on parameter names added to / removed from the default
            targets (Conv1d/2d/3d and Linear weights).
        dense_first, dense_last: keep the first / last default target dense.
        seed: seed of the generator for random masks; ``None`` takes ``torch.initial_seed()``
            (set by ``seed_everything``) from rank 0.
        log_per_layer: also log the sparsity of every target.
        reapply: ``auto`` or ``always``: when to multiply the weights by their masks (above).
        kernel: how masks are multiplied in every step: ``auto`` (compiled on CUDA, eager
            on CPU), ``eager`` (one ``torch._foreach_mul_``) or ``compiled`` (``torch.compile``,
            falls back to eager with one warning where compilation fails).

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[SparsityCallback(GMP(sparsity=0.9))])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        method: SparsityMethod,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        dense_first: bool = False,
        dense_last: bool = False,
        seed: int | None = None,
        log_per_layer: bool = True,
        reapply: str = "auto",
        kernel: str = "auto",
    ):
        if not isinstance(method, SparsityMethod):
            raise SparsityConfigError(
                f"method={method!r} is not a sparsity method; pass one of sparsetrain.methods "
                "(Dense, Static, GMP, ...)"
            )
        self.method = method
        self.include, self.exclude = include, exclude
        self.dense_first, self.dense_last = dense_first, dense_last
        self.seed = seed
        self.log_per_layer = log_per_layer
        if reapply not in ("auto", "always"):
            raise SparsityConfigError(f"reapply={reapply!r} is unknown; allowed: auto, always")
        self.reapply = reapply
        self.kernel = MaskKernel(kernel)
        self.sampler = StochasticKernel(kernel)
        self._swap: ParameterSwap | None = None
        self._reapply_every_step = True
        self.targets: dict[str, Tensor] = {}
        self.masks: Masks | None = None
        self.step = 0
        self.generator = torch.Generator()
        self._seed: int | None = None
        self._total_steps: int | None = None
        self._grads: dict[str, Tensor] | None = None
        self._restored: dict | None = None
        self._change_metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.targets = select_targets(pl_module, self.include, self.exclude, self.dense_first, self.dense_last)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self._total_steps = int(total) if math.isfinite(total) else None
        self.method.setup(self._total_steps)
        if self._restored is not None:
            self._load_restored(self._restored)
            self._restored = None
        else:
            self._seed = self.seed if self.seed is not None else torch.initial_seed() % (2**63)
            self._seed = int(trainer.strategy.broadcast(self._seed, src=0))
            self.generator.manual_seed(self._seed)
            self.step = 0
            self.masks = self.method.init_masks(self._context())
            if self.masks is not None:
                self.masks = {n: m.to(device=self.targets[n].device, dtype=torch.bool) for n, m in self.masks.items()}
            if self.method.is_update_step(0):
                self._update(trainer, 0)
        self._apply_to_weights()  # not while the masks are stochastic
        self._reapply_every_step = self.reapply == "always" or not all(
            keeps_masked_weights_zero(opt) for opt in trainer.optimizers
        )
        self._check_ranks_agree(trainer)
        self._log(trainer, self.step)
        log.info("%s on %d targets (%s weights)", self.method, len(self.targets), f"{self.sparsity_report().numel:,}")

    def _context(self) -> SparsityContext:
        return SparsityContext(self.targets, self.masks, self._total_steps, self.generator)

    # ----------------------------------------------------------- every step
    def _stochastic(self, step: int) -> bool:
        return self.masks is not None and self.method.stochastic(step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._stochastic(step):
            base, scale = self.method.forward_probabilities(self._context(), step)
            seed = derive_seed(self._seed, step, batch_idx)
            bases = [base[n] for n in self.targets]
            sampled = self.sampler.sample(self.targets.values(), self.masks.values(), bases, scale, seed)
            self._swap_in(pl_module, sampled)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.masks is None:
            return
        params = list(self.targets.values())
        upcoming = trainer.global_step + 1
        if self._grads is None and self.method.needs_grads(upcoming):
            self._grads = {
                n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in self.targets.items()
            }
        if not self._stochastic(trainer.global_step):  # sampled weights learn: their gradients stay
            self.kernel([p.grad for p in params], self.masks.values())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._restore()  # also when the batch had no backward
        step = trainer.global_step
        if step == self.step:  # no optimizer step on this batch (gradient accumulation)
            return
        self.step = step
        if self._reapply_every_step:
            self._apply_to_weights()
        if self.method.is_update_step(step):
            self._update(trainer, step)
            self._log(trainer, step)
        self._grads = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()  # in case a callback ended the epoch between batch start and end
        self._apply_to_weights()
        report = self.sparsity_report()
        pl_module.log("sparsity/global", report.global_sparsity, prog_bar=True, sync_dist=True)
        pl_module.log("sparsity/target", self.method.target_sparsity(self.step), sync_dist=True)

    @torch.no_grad()
    def _apply_to_weights(self) -> None:
        if self.masks is not None and not self._stochastic(self.step):
            self.kernel(self.targets.values(), self.masks.values())

    # ------------------------------------------------- stochastic masks: swaps
    def _swap_in(self, pl_module: pl.LightningModule, tensors: list[Tensor]) -> None:
        if self._swap is None:
            self._swap = ParameterSwap(pl_module, self.targets)
        self._swap.swap_in(tensors)

    def _restore(self) -> None:
        if self._swap is not None:
            self._swap.restore()

    def _eval_batch_start(self, pl_module: pl.LightningModule) -> None:
        if self._stochastic(self.step):  # evaluation sees the target network w * mask
            self._swap_in(pl_module, self.sampler.deterministic(self.targets.values(), self.masks.values()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_start(pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_start(pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._restore()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._restore()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._restore()

    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``trainer.validate/test/predict(ckpt_path=...)``: take the masks from the checkpoint."""
        if self._restored is not None and trainer.state.fn != "fit":
            self.targets = select_targets(pl_module, self.include, self.exclude, self.dense_first, self.dense_last)
            self._load_restored(self._restored)
            self._restored = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        self._swap = None

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, step: int) -> None:
        new = self.method.update(self._context(), step, self._grads)
        self._grads = None
        if new is None:
            return
        new = {n: m.to(device=self.targets[n].device, dtype=torch.bool) for n, m in new.items()}
        if self.masks is not None:
            keep = [self.masks[n] & new[n] for n in self.targets]  # positions active before and after
            if not self.method.stochastic(step):  # stochastic masks zero nothing; state resets when they turn hard
                for optimizer in trainer.optimizers:
                    reset_optimizer_state_(optimizer, self.targets.values(), keep)
            self._change_metrics = _mask_change(self.masks, new, keep)
        self.masks = new
        self._apply_to_weights()
        self._check_ranks_agree(trainer)

    # -------------------------------------------------------------- reports
    def sparsity_report(self) -> SparsityReport:
        """Zeros counted in every target weight right now."""
        if not self.targets:
            raise RuntimeError("SparsityCallback has no targets yet: call trainer.fit first")
        return sparsity_report(self.targets)

    def _log(self, trainer: pl.Trainer, step: int) -> None:
        metrics = self.sparsity_report().metrics(per_layer=self.log_per_layer)
        metrics["sparsity/target"] = self.method.target_sparsity(step)
        metrics.update({k: v for k, v in self._change_metrics.items() if self.log_per_layer or k.endswith("/global")})
        metrics.update(self.method.last_metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ DDP
    def _check_ranks_agree(self, trainer: pl.Trainer) -> None:
        if trainer.world_size <= 1 or self.masks is None:
            return
        device = trainer.strategy.root_device
        prints = torch.stack([_fingerprint(m) for m in self.masks.values()]).to(device)
        gathered = trainer.strategy.all_gather(prints)
        if not bool((gathered == gathered[0]).all()):
            names = [n for i, n in enumerate(self.masks) if not bool((gathered[:, i] == gathered[0, i]).all())]
            raise RuntimeError(
                f"sparsity masks differ across DDP ranks at step {self.step} in {names}; every rank must see "
                "identical weights and all-reduced gradients (is a target outside DDP's gradient sync?)"
            )

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "targets": list(self.targets),
            "masks": None if self.masks is None else {n: m.detach().cpu() for n, m in self.masks.items()},
            "method": self.method.state_dict(),
            "method_name": type(self.method).__name__,
            "generator": self.generator.get_state(),
            "seed": self._seed,
            "step": self.step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict  # applied in on_fit_start, once the targets are known

    # A torch.Generator pickles its state as a temporary tensor, which torch.multiprocessing
    # (ddp_spawn) shares by file descriptor and frees before the child reads it; send bytes.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["generator"] = bytes(self.generator.get_state().numpy())
        state["_swap"] = None  # refers to the model
        return state

    def __setstate__(self, state: dict) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)

    def _load_restored(self, state: dict) -> None:
        if state["method_name"] != type(self.method).__name__:
            raise SparsityConfigError(
                f"the checkpoint was written by method {state['method_name']}, but this callback runs "
                f"{type(self.method).__name__}; resume with the same method"
            )
        masks = state["masks"]
        if masks is not None and list(masks) != list(self.targets):
            raise SparsityConfigError(
                f"the checkpoint has masks for targets {list(masks)[:4]}... but this model's targets are "
                f"{list(self.targets)[:4]}...; resume with the same model and include/exclude settings"
            )
        self.masks = None if masks is None else {n: m.to(self.targets[n].device) for n, m in masks.items()}
        self.method.load_state_dict(state["method"])
        self.generator.set_state(state["generator"])
        self._seed, self.step = state["seed"], state["step"]


def _mask_change(old: Masks, new: Masks, kept: list[Tensor]) -> dict[str, float]:
    """Fraction of the new active weights that were not active before, per layer and global."""
    active = {n: int(m.sum()) for n, m in new.items()}
    grown = {n: active[n] - int(k.sum()) for n, k in zip(new, kept)}
    metrics = {f"sparsity/mask_change/{n}": grown[n] / max(active[n], 1) for n in new}
    metrics["sparsity/mask_change/global"] = sum(grown.values()) / max(sum(active.values()), 1)
    return metrics


def _fingerprint(mask: Tensor) -> Tensor:
    """Two int64 numbers that differ, with overwhelming probability, for different masks."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    return torch.stack([positions.numel() * torch.ones((), dtype=torch.int64, device=mask.device),
                        (positions * 2654435761 % 2147483647).sum()])
