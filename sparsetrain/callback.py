"""``SparsityCallback``: a :class:`~sparsetrain.engine.SparsityEngine` driven by a Lightning ``Trainer``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from sparsetrain import checkpoint
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.report import SparsityReport, sparsity_report
from sparsetrain.engine import SparsityEngine
from sparsetrain.integrations.lightning import averaged_copies, check_strategy, grad_scaling, other_callbacks
from sparsetrain.methods.base import SparsityMethod


def _engine(name: str, doc: str = "") -> property:
    return property(lambda self: getattr(self.engine, name), doc=doc or f"The engine's ``{name}``.")


class SparsityCallback(Callback):
    """Make a model sparse while it trains with a Lightning ``Trainer``.

    All the work is done by a :class:`~sparsetrain.engine.SparsityEngine` (``callback.engine``); the callback
    tells it *when*, from Lightning's hooks:

    * ``on_fit_start`` (or ``on_train_start`` where the strategy restores checkpoints later, FSDP2): targets of
      the final model, masks (from the checkpoint, the previous fit of the same model, or the method);
    * ``on_train_batch_start`` / ``on_after_backward``: the forward-time weights of soft masks (stochastic
      annealing, SR-STE), swapped into the modules for the batch and back;
    * ``on_before_optimizer_step`` (after AMP unscaling, before gradient clipping): copy the gradients an
      update needs, zero those of masked weights (the targets the optimizer trains now);
    * ``on_train_batch_end``: the updates of every step the batch made (``trainer.global_step``, every
      optimizer counted), new masks to weights, optimizer state and the weight averages of
      ``WeightAveraging``/``EMAWeightAveraging``/``StochasticWeightAveraging``;
    * at validation/test/predict start, checkpoint save and fit end (after every other callback's
      ``on_train_end``): the invariant, every masked weight exactly 0 (re-applied, and warned about naming
      the layers when something else wrote them);
    * ``on_train_end``: below the method's final sparsity, warn or prune (``finalize``); ``on_fit_end`` also warns
      when the best checkpoint predates the final sparsity and when weights trained that are not targets.

    Sparsity counted from the weights (``sparsity/global``, ``sparsity/layer/<name>``) and the method's target
    (``sparsity/target``) go to the Trainer's loggers after every update and at every epoch end. The run's
    state (masks, method state, generator, step) is in every checkpoint, so ``trainer.fit(..., ckpt_path=...)``
    resumes exactly. Under DDP every rank decides from the same all-reduced gradients with an identically
    seeded generator, and the masks are compared after every update; under FSDP2 every rank keeps the masks of
    its rows (docs/distributed.md). The rules on every path users take are in docs/rules.md.

    Args:
        method: a :class:`~sparsetrain.methods.base.SparsityMethod` (``GMP``, ``Static``, ...), or its registered
            name (``"gmp"``, ``"rigl"``, ...; :data:`sparsetrain.methods.METHODS`) with the method's arguments as
            further keywords: ``SparsityCallback("rigl", sparsity=0.9, every=100)``.
        include, exclude: globs on parameter names added to / removed from the default targets.
        dense_first, dense_last: keep the first / last default target dense.
        seed: seed of the generator for random masks; ``None`` takes ``torch.initial_seed()`` (set by
            ``seed_everything``) from rank 0.
        log_per_layer: also log the sparsity of every target.
        reapply: ``auto`` (multiply the weights by their masks after a step only when an optimizer may move a zero
            weight with a zero gradient) or ``always``.
        kernel: ``auto``, ``eager`` or ``compiled``: how masks are multiplied (:mod:`sparsetrain.core.kernels`).
        on_config_change: a resume from a checkpoint written with another configuration: ``error`` (default)
            fails at fit start naming every change; ``continue`` warns and trains on from its masks.
        finalize: a fit that ends below the method's final sparsity: ``warn`` (default), or ``prune`` to it.
        compute: ``masked`` (default), ``sparse`` or ``auto``: run the target layers' forward and backward on sparse
            kernels with the mask's pattern (docs/sparse_compute.md); parameters, optimizer and checkpoints unchanged.

    Two callbacks on one Trainer need disjoint targets (``include``/``exclude``); each callback's checkpoint key
    (``state_key``) is built from these. A second ``fit`` of the same model continues from the current masks;
    a new model gets new masks.

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[SparsityCallback(GMP(sparsity=0.9))])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        method: SparsityMethod | str,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        dense_first: bool = False,
        dense_last: bool = False,
        seed: int | None = None,
        log_per_layer: bool = True,
        reapply: str = "auto",
        kernel: str = "auto",
        on_config_change: str = "error",
        finalize: str = "warn",
        compute: str = "masked",
        **method_args,
    ):
        self.engine = SparsityEngine(
            method, include, exclude, dense_first, dense_last, seed, log_per_layer, reapply, kernel, on_config_change,
            finalize, compute, **method_args,
        )  # fmt: skip
        self._checkpoint_state: dict | None = None  # from load_state_dict, until the fit or the evaluation starts
        self._fit_trainer: int | None = None
        self._deferred = False  # the masks wait for on_train_start: the strategy restores the checkpoint later
        self._steps_per_batch: int | None = None  # manual optimization: the optimizer steps of a batch
        self._batch_start_step = 0

    method = _engine("method", "The sparsity method.")
    targets = _engine("targets", "``{name: parameter}`` of the weights the masks apply to (after fit start).")
    masks = _engine("masks", "``{name: bool tensor}``, ``None`` before fit start or for ``Dense``.")
    step = _engine("step", "Optimizer steps seen (``trainer.global_step`` after each batch).")
    generator, kernel, sampler, seed = _engine("generator"), _engine("kernel"), _engine("sampler"), _engine("seed")
    reapply, finalize, on_config_change = _engine("reapply"), _engine("finalize"), _engine("on_config_change")
    log_per_layer, _total_steps, _reapply_every_step = _engine("log_per_layer"), _engine("total_steps"), _engine("_reapply_every_step")
    _forward = _engine("_forward")  # forwards sampled in the current training batch, minus one
    include = property(lambda self: self.engine.selection.include)
    exclude = property(lambda self: self.engine.selection.exclude)
    dense_first = property(lambda self: self.engine.selection.dense_first)
    dense_last = property(lambda self: self.engine.selection.dense_last)

    @property
    @override
    def state_key(self) -> str:
        """``SparsityCallback``, or with the target selection appended when it is not the default."""
        selection = self.engine.selection.changed()
        return self._generate_state_key(**selection) if selection else type(self).__qualname__

    # ------------------------------------------------------------------ start
    def _count_total_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """All optimizer steps of this fit (``None`` if unknown): what fractions of training refer to."""
        self._steps_per_batch = None if pl_module.automatic_optimization else max(1, len(trainer.optimizers))
        total = trainer.estimated_stepping_batches
        if self._steps_per_batch is not None and trainer.max_epochs != -1 and math.isfinite(trainer.num_training_batches):
            total = self._steps_per_batch * trainer.num_training_batches * max(trainer.max_epochs, 1)
            total = min(total, trainer.max_steps) if trainer.max_steps != -1 else total
        return int(total) if math.isfinite(total) and total > 0 else None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer)
        self.engine.inform = rank_zero_info
        self.engine.setup(pl_module, trainer.optimizers, self._count_total_steps(trainer, pl_module))
        for other in trainer.callbacks:
            if other is not self and isinstance(other, SparsityCallback) and other._fit_trainer == id(trainer):
                shared = [n for n, p in self.targets.items() if any(p is q for q in other.targets.values())]
                if shared:
                    raise SparsityConfigError(
                        f"two SparsityCallbacks on one Trainer both target {', '.join(shared[:6])}; give each its own "
                        "weights with include=/exclude= globs (e.g. exclude='head.*' on one, exclude='backbone.*' on the other)"
                    )
        self._fit_trainer = id(trainer)
        # ModelParallelStrategy (FSDP2) restores a checkpoint's weights and callback state only after this hook
        self._deferred = getattr(trainer.strategy, "restore_checkpoint_after_setup", False)
        if not self._deferred:
            self._begin(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._deferred = False
            self._begin(trainer)

    def _begin(self, trainer: pl.Trainer) -> None:
        if self._checkpoint_state is not None:
            self.engine.load_state_dict(self._checkpoint_state, trainer.ckpt_path, self.state_key)
            self._checkpoint_state = None
        self.engine.copies = averaged_copies(trainer)
        self.engine.begin(trainer.global_step)
        self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        for step, metrics in self.engine.pop_metrics():
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------- every step
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._batch_start_step = trainer.global_step
        self.engine.begin_training_forwards(pl_module, (trainer.global_step, batch_idx))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.restore()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        self.engine.optimizers = trainer.optimizers
        step = trainer.global_step + 1
        scale, skipped = grad_scaling(trainer, optimizer, check_inf=self.method.is_update_step(step))
        if not skipped:  # a step GradScaler skips makes no update that ranks by its (inf/NaN) gradients
            self.engine.before_optimizer_step(optimizer, step, grad_scale=scale)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.engine.end_forwards()  # also when the batch had no backward
        made = trainer.global_step - self._batch_start_step
        if self._steps_per_batch is not None and made != self._steps_per_batch and self.method.uses_fractions():
            raise SparsityConfigError(
                f"a training batch made {made} optimizer steps, but {type(self.method).__name__}'s schedule has "
                f"fractions of training, resolved for {self._steps_per_batch} steps per batch (one per optimizer, "
                "manual optimization): give start/end/every as int numbers of optimizer steps (trainer.global_step)"
            )
        self.engine.advance(trainer.global_step)
        self._log(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.restore()  # in case a callback ended the epoch between batch start and end
        self.engine.apply_masks()
        report = self.engine.report()
        # the same value on every rank (identical masks, checked): no collective, so an epoch end with uneven
        # batches across ranks does not wait here
        pl_module.log("sparsity/global", report.global_sparsity, prog_bar=True, sync_dist=False)
        pl_module.log("sparsity/target", self.method.target_sparsity(self.step), sync_dist=False)

    # -------------------------------------------------------------------- end
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.finish()
        self._log(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After every other callback's ``on_train_end`` (weight averaging copies its average in there)."""
        self.engine.copies = averaged_copies(trainer)
        self.engine.enforce("fit end", other_callbacks(trainer, self))
        untrained = self.engine.untrained_prunable(pl_module) if self.targets else []
        if untrained:
            rank_zero_warn(
                f"SparsityCallback: {len(untrained)} prunable weights trained during the fit but are not targets, so they "
                f"stayed dense: {', '.join(untrained[:6])}{', ...' if len(untrained) > 6 else ''} (frozen or in no "
                "optimizer at fit start, unfrozen since, e.g. by BackboneFinetuning). The report counts only the "
                "targets. Name them in include= to prune them from the start."
            )
        for callback in trainer.checkpoint_callbacks:
            best = getattr(callback, "best_model_path", "") if getattr(callback, "monitor", None) else ""  # else the last
            state = checkpoint.read_state(best, self.state_key) if best and trainer.is_global_zero else None
            if state is not None and state.get("final") is False:
                rank_zero_warn(
                    f"SparsityCallback: the best checkpoint ({best}, monitor={callback.monitor!r}) was saved at step "
                    f"{state['step']} at {state['sparsity']:.2%} sparsity, before {type(self.method).__name__} reached "
                    "its final sparsity with hard masks: trainer.test(ckpt_path='best') and load_from_checkpoint give "
                    "that model. Use sparsetrain.SparsityModelCheckpoint (best only once the schedule has ended) or the "
                    "final weights (save_last=True)."
                )
        self.engine.copies = []

    # ------------------------------------------------------------- evaluation
    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``trainer.validate/test/predict(ckpt_path=...)`` takes the masks (and targets) from the checkpoint."""
        if self._checkpoint_state is not None and trainer.state.fn != "fit":
            self.engine.load_state_dict(self._checkpoint_state, trainer.ckpt_path, self.state_key)
            self._checkpoint_state = None
            self.engine.load_for_evaluation(pl_module)
        self.engine.copies = averaged_copies(trainer)
        self.engine.enforce(f"{stage} start", other_callbacks(trainer, self))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module, "validation")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module, "predict")

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.engine.swap_in_evaluation(pl_module)

    on_test_batch_start = on_predict_batch_start = on_validation_batch_start

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.engine.restore()

    on_test_batch_end = on_predict_batch_end = on_validation_batch_end

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()  # Lightning calls no teardown hook after an exception
        # no count under sharding: it is a collective, and the other ranks may be gone
        if isinstance(exception, KeyboardInterrupt) and self.engine.shards is None:
            report = self.engine._short_of_target()
            if report is not None:
                rank_zero_warn(
                    f"SparsityCallback: interrupted at step {self.step} at {report.global_sparsity:.2%} "
                    f"sparsity, below the target {self.method.sparsity:.2%}; resume from a checkpoint to finish the schedule"
                )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        """The model back to itself (parameters in their modules, dense kernels), optimizers and copies let go."""
        self.engine.end_forwards()
        self.engine._swap = None
        self.engine.copies, self.engine.optimizers = [], []
        self.engine.stop_sparse_compute()

    # -------------------------------------------------------------- reports
    def sparsity_report(self, model: nn.Module | None = None) -> SparsityReport:
        """Zeros counted in every target weight right now.

        ``model``: count in this model's weights instead, the targets chosen by this callback's
        include/exclude settings (e.g. in the launching process after ``strategy="ddp_spawn"``,
        where the trained weights come back into your model but the callback's masks stay in
        the worker processes).
        """
        if model is not None:
            chosen = self.engine.selection.select(model)
            names = [n for n in self.targets if n in chosen] or [n for n, p in chosen.items() if p.requires_grad]
            return sparsity_report({n: chosen[n] for n in names})
        if not self.targets:
            raise RuntimeError(
                "SparsityCallback has no targets in this process: call trainer.fit first. After a fit with "
                "strategy='ddp_spawn' the masks stay in the worker processes, but the trained weights are back in your "
                "model: use callback.sparsity_report(model)."
            )
        return self.engine.report()

    # ------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict:
        return self.engine.state_dict(gather=False)  # sharded masks: in on_save_checkpoint

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._checkpoint_state = state_dict  # applied in on_fit_start (on_train_start under FSDP2), once targets are known

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint_dict: dict) -> None:
        self.engine.copies = averaged_copies(trainer)
        # the weights saved are masked in place; the count agrees on every rank (all-reduced under FSDP2)
        if self.engine.enforce("checkpoint save", other_callbacks(trainer, self)):
            checkpoint_dict["callbacks"][self.state_key].update(final=self.engine.at_final_sparsity(), sparsity=self.engine.report().global_sparsity)
        if self.engine.shards is not None and self.masks is not None:
            distributed = getattr(trainer.strategy, "_save_distributed_checkpoint", True)
            checkpoint.save_sharded_masks(checkpoint_dict, self.state_key, self.targets, self.masks, distributed)
