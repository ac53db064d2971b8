"""``SparsityCallback``: runs a sparsity method inside a Lightning ``Trainer``."""

from __future__ import annotations

import fnmatch
import logging
import math
import zlib
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.fingerprint import compare_across_ranks, mask_hashes
from sparsetrain.core.kernels import MaskKernel
from sparsetrain.core.masks import Masks, keeps_masked_weights_zero, reset_optimizer_state_
from sparsetrain.core.report import SparsityReport, sparsity_report
from sparsetrain.core.shards import Shards, local, pack_rows, total_counts, unpack_rows
from sparsetrain.core.starved import starved_layers, starved_message
from sparsetrain.sharded_checkpoint import MASK_PREFIX
from sparsetrain.core.stochastic import ParameterSwap, StochasticKernel, derive_seed, straight_through_masked
from sparsetrain.core.targets import select_targets
from sparsetrain.core.validation import check_choice, check_int
from sparsetrain.methods import method_from_name
from sparsetrain.methods.base import SparsityContext, SparsityMethod

CONFIG_CHANGES = ("error", "continue")
FINALIZE = ("warn", "prune")

log = logging.getLogger(__name__)


class SparsityCallback(Callback):
    """Make a model sparse while it trains.

    At fit start the callback picks the prunable weights (see
    :func:`sparsetrain.core.select_targets`) and asks ``method`` for masks. Then, every
    optimizer step:

    1. ``on_before_optimizer_step`` (after AMP unscaling, before gradient clipping): copy the
       dense gradients if the method's next update needs them, then zero the gradients of
       masked weights;
    2. at the end of the batch (``on_train_batch_end``): multiply the weights by their masks in
       one fused pass; for every update step the batch crossed ask the method for new masks,
       zero newly pruned weights and the optimizer state (momentum, Adam moments) of every
       position whose mask changed.

    With ``reapply="auto"`` the per-step multiply of the weights is skipped when every
    optimizer is a plain ``SGD``, ``Adam``, ``AdamW``, ``NAdam``, ``RAdam``, ``Adamax``,
    ``Adagrad``, ``RMSprop`` or ``Adadelta``: with a zero gradient and zero state their step
    leaves a zero weight exactly zero (weight decay included), so masking the gradients is
    the only per-step pass over the weights. Masks are still applied to the weights at fit
    start, at every update and at the end of every epoch. ``reapply="always"`` multiplies
    after every step (use it with other optimizers or callbacks that write the weights).

    Stochastic masks (:class:`~sparsetrain.methods.StochasticAnnealing`): while
    ``method.stochastic(step)`` is true the weights and gradients are *not* multiplied by the
    masks. Instead, for every training forward the callback samples ``w * (mask | (u < p))``
    for every target (see :mod:`sparsetrain.core.stochastic`; ``u`` from a generator seeded with
    ``(seed, step, batch_idx, forward, target)``, identical on every rank, global RNG untouched)
    and puts these tensors in place of the parameters inside their modules
    (``module._parameters``, no renaming): the first sample at ``on_train_batch_start``, a new
    one whenever a module that owns a target runs a second time in the batch (forward pre-hooks
    that exist only during such batches; a ``training_step`` that calls the model twice gets two
    masks). ``on_after_backward`` puts the parameters back, so autograd has given each parameter
    the sum of ``grad * sampled_mask`` over its forwards. Evaluation batches (validation, test, predict) get
    ``w * mask`` the same way. Optimizer state is reset only when masks become hard: at the
    method's last update the excluded weights and their state are zeroed, and from then on the
    masks are hard as for every other method. Outside a batch the model holds its parameters:
    state-dict keys, ``deepcopy`` and pickling are unaffected. Straight-through methods
    (:class:`~sparsetrain.methods.SRSTE`) use the same swaps with ``w * mask`` and a gradient that
    reaches the dense ``w`` unmasked; before every optimizer step the method may add its term to
    the gradients (SR-STE's decay of the pruned weights).

    Sparsity counted from the weights (``sparsity/global``, ``sparsity/layer/<name>``) and the
    method's target (``sparsity/target``) go to the Trainer's loggers after every update and
    at the end of every training epoch. Masks, method state, RNG state and the step counter
    are saved in Lightning checkpoints, so ``trainer.fit(..., ckpt_path=...)`` resumes with
    the same masks and schedule. Under DDP all ranks decide from the same all-reduced
    gradients and identical weights with an identically seeded generator; after every update
    the callback checks that the masks agree on every rank and raises if they do not.

    Sharded parameters: under FSDP2 (``fully_shard`` in ``configure_model()``, Lightning's
    ``ModelParallelStrategy``) every rank keeps the masks of its own rows of each weight and applies
    them to its pieces of the weights, gradients and optimizer state; counts, per-layer top-k and the
    global threshold are over the whole tensors (a few small collectives, no weights gathered), and
    the masks are bitwise those of an unsharded run. ``sparsity_report()`` is then a collective (call
    it on every rank). Masks are checkpointed with the sharded weights, bit-packed; see
    :func:`sparsetrain.consolidate_checkpoint` and docs/distributed.md for what is supported.

    Steps, several optimizers, unknown length. A step is one optimizer step, every optimizer
    counted (Lightning's ``trainer.global_step``): with manual optimization and two optimizers
    (a GAN) a batch makes two steps. Every step is seen, also when a batch makes several: the
    updates of all steps a batch crossed run at its end, each with the gradients that its own
    optimizer stepped with and moving only the targets that optimizer trains. Fractions of
    training resolve against the real number of optimizer steps (for manual optimization,
    ``len(trainer.optimizers)`` steps per batch, checked after every batch; a batch that makes
    another number fails with a message asking for int steps). With data of unknown length
    and no ``max_steps``, fractions fail at fit start; int steps work.

    Targets are chosen at fit start, once the model is final (after ``setup()``,
    ``configure_model()`` and the strategy's wrapping): the default prunable weights (see
    :func:`sparsetrain.core.select_targets`) that some optimizer trains. Frozen weights
    (``requires_grad=False``) and weights in no optimizer are left out, with a log line; a glob
    in ``include`` that names them makes them targets anyway, and then no drop-and-grow method
    ever grows into them.

    Args:
        method: a :class:`~sparsetrain.methods.base.SparsityMethod` (``GMP``, ``Static``, ...), or
            its name (``"dense"``, ``"static"``, ``"gmp"``, ``"rigl"``, ``"set"``, ``"granet"``,
            ``"annealing"``, ``"fixed"``) with the method's arguments as further keywords:
            ``SparsityCallback("rigl", sparsity=0.9, every=100)``.
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
        on_config_change: what a resume does when the checkpoint was written with another
            configuration (the method's arguments or the target selection; ``seed`` does not
            count, the checkpoint's generator wins): ``error`` (default) fails at fit start
            naming every change; ``continue`` warns and trains on from the checkpoint's masks
            with the new configuration (its schedule from the checkpoint's step on).
        finalize: what happens when a fit ends (early stopping, ``max_time``, a schedule longer
            than the run) with fewer zeros than the method's final sparsity: ``warn`` (default)
            says so; ``prune`` also prunes to the final sparsity at once (the method's final
            masks, e.g. GMP's magnitude pruning to ``sparsity``), without fine-tuning after it.

    Two callbacks on one Trainer (e.g. one method for the backbone, another for the head) need
    disjoint targets: give them ``include``/``exclude`` globs. Each callback's checkpoint key
    (``state_key``) is built from these, so both resume. A second ``fit`` with the same callback
    and the same model continues from the current masks (the schedule restarts at the new fit's
    step); a new model gets new masks.

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
        on_config_change: str = "error",
        finalize: str = "warn",
        **method_args,
    ):
        if isinstance(method, str):
            method = method_from_name(method, **method_args)
        elif method_args:
            raise SparsityConfigError(
                f"{', '.join(method_args)}: method arguments go with a method name, e.g. "
                f"SparsityCallback('rigl', sparsity=0.9); {type(method).__name__} is already built"
            )
        if not isinstance(method, SparsityMethod):
            raise SparsityConfigError(
                f"method={method!r} is not a sparsity method; pass one of sparsetrain.methods "
                "(Dense, Static, GMP, ...) or its name ('gmp', 'rigl', ...)"
            )
        self.method = method
        self.include, self.exclude = include, exclude
        self.dense_first, self.dense_last = dense_first, dense_last
        self.seed = None if seed is None else check_int(seed, "seed", meaning="seed of the mask generator, or None")
        self.log_per_layer = log_per_layer
        self.reapply = check_choice(reapply, "reapply", ("auto", "always"))
        self.on_config_change = check_choice(on_config_change, "on_config_change", CONFIG_CHANGES)
        self.finalize = check_choice(finalize, "finalize", FINALIZE)
        self.kernel = MaskKernel(kernel)
        self.sampler = StochasticKernel(kernel)
        self._swap: ParameterSwap | None = None
        self._hooks: list = []  # forward pre-hooks, only while a training batch samples stochastic masks
        self._batch: tuple[int, int] = (0, 0)  # (step, batch_idx) of the training batch that samples
        self._forward = 0  # forwards sampled in that batch, minus one
        self._seen: set[int] = set()  # target-owning modules that ran in the current forward
        self._reapply_every_step = True
        self.targets: dict[str, Tensor] = {}
        self.masks: Masks | None = None
        self.step = 0
        self.generator = torch.Generator()
        self._seed: int | None = None
        self._total_steps: int | None = None
        self._steps_per_batch = 1
        self._batch_start_step = 0
        self._optimizer_targets: dict[int, frozenset[str]] = {}
        self._grads: dict[int, dict[str, Tensor]] = {}  # by the step whose update needs them
        self._stepped: dict[int, frozenset[str]] = {}  # targets trained by the optimizer of each step
        self._restored: dict | None = None
        self._change_metrics: dict[str, float] = {}
        self._final = False  # finalize="prune" made the masks hard early
        self._warned_nonfinite = False
        self._fit_trainer: int | None = None
        self._shards: Shards | None = None  # FSDP2: where each target's local piece lies (core/shards.py)
        self._deferred = False  # masks wait for on_train_start: the strategy restores the checkpoint after on_fit_start
        self._previous: dict[str, Tensor] = {}  # the targets of the previous fit, while the masks wait (deferred)

    @property
    @override
    def state_key(self) -> str:
        """``SparsityCallback``, or with the target selection appended when it is not the default."""
        selection = dict(include=self.include, exclude=self.exclude, dense_first=self.dense_first, dense_last=self.dense_last)
        selection = {k: v for k, v in selection.items() if v not in (None, False)}
        return self._generate_state_key(**selection) if selection else type(self).__qualname__

    # ---------------------------------------------------------------- setup
    def _select(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Targets of the final model: default weights that an optimizer trains, plus explicit includes."""
        targets = select_targets(pl_module, self.include, self.exclude, self.dense_first, self.dense_last)
        in_optimizers = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        includes = [self.include] if isinstance(self.include, str) else list(self.include or [])
        untrained = [
            n for n, p in targets.items()
            if (not p.requires_grad or (in_optimizers and id(p) not in in_optimizers))
            and not any(fnmatch.fnmatchcase(n, g) for g in includes)
        ]
        if untrained:
            rank_zero_info(
                f"SparsityCallback: {len(untrained)} weights are frozen or in no optimizer and stay dense (not targets): "
                f"{', '.join(untrained[:8])}{', ...' if len(untrained) > 8 else ''}. Name them in include= to prune them anyway."
            )
            targets = {n: p for n, p in targets.items() if n not in untrained}
        if not targets:
            raise SparsityConfigError(
                f"{type(pl_module).__name__} has no prunable weights that an optimizer trains: every default target is "
                "frozen or in no optimizer. Name the parameters to prune with `include` (globs on parameter names)."
            )
        for other in trainer.callbacks:
            if other is not self and isinstance(other, SparsityCallback) and other._fit_trainer == id(trainer):
                shared = [n for n, p in targets.items() if any(p is q for q in other.targets.values())]
                if shared:
                    raise SparsityConfigError(
                        f"two SparsityCallbacks on one Trainer both target {', '.join(shared[:6])}; give each its own "
                        "weights with include=/exclude= globs (e.g. exclude='head.*' on one, exclude='backbone.*' on the other)"
                    )
        self._fit_trainer = id(trainer)
        self._optimizer_targets = {
            id(opt): frozenset(
                n for n, p in targets.items() if p.requires_grad and any(p is q for g in opt.param_groups for q in g["params"])
            )
            for opt in trainer.optimizers
        }
        return targets

    def _count_total_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """All optimizer steps of this fit (``None`` if unknown): what fractions of training refer to."""
        self._steps_per_batch = 1 if pl_module.automatic_optimization else max(1, len(trainer.optimizers))
        total = trainer.estimated_stepping_batches
        if self._steps_per_batch > 1 and trainer.max_epochs != -1 and math.isfinite(trainer.num_training_batches):
            total = self._steps_per_batch * trainer.num_training_batches * max(trainer.max_epochs, 1)
            total = min(total, trainer.max_steps) if trainer.max_steps != -1 else total
        return int(total) if math.isfinite(total) and total > 0 else None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        previous = self.targets
        self.targets = self._select(trainer, pl_module)
        self._shards = _sharding(trainer, self.targets, self.method)
        self._total_steps = self._count_total_steps(trainer, pl_module)
        self.method.setup(self._total_steps)
        self.method.check(self._shapes())
        self._final = False
        self._grads, self._stepped = {}, {}
        self._reapply_every_step = self.reapply == "always" or not all(
            keeps_masked_weights_zero(opt) for opt in trainer.optimizers
        )
        # ModelParallelStrategy (FSDP2), FSDPStrategy, DeepSpeed restore a checkpoint's weights and callback state
        # only after this hook (and trainer.ckpt_path is set then): the masks wait for on_train_start
        self._deferred = getattr(trainer.strategy, "restore_checkpoint_after_setup", False)
        if self._deferred:
            self._previous = previous
            return
        self._begin(trainer, previous)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._deferred = False
            self._begin(trainer, self._previous)
            self._previous = {}

    def _begin(self, trainer: pl.Trainer, previous: dict[str, Tensor]) -> None:
        """Masks of this fit: the checkpoint's, the previous fit's (same model), or new ones from the method."""
        if self._restored is not None:
            self._load_restored(self._restored, trainer.ckpt_path)
            self._restored = None
        elif self.masks is not None and list(previous) == list(self.targets) and all(
            previous[n] is p for n, p in self.targets.items()
        ):
            self.step = trainer.global_step
            rank_zero_info(
                f"SparsityCallback: a new fit of the same model continues from the masks of the previous fit "
                f"({self.sparsity_report().global_sparsity:.2%} sparse); the schedule restarts at step {self.step}. "
                "Use a new SparsityCallback to start from fresh masks."
            )
        else:
            self._seed = self.seed if self.seed is not None else torch.initial_seed() % (2**63)
            self._seed = int(trainer.strategy.broadcast(self._seed, src=0))
            self.generator.manual_seed(self._seed)
            self.step = trainer.global_step
            self.masks = self.method.init_masks(self._context())
            if self.masks is not None:
                self.masks = {n: m.to(device=local(self.targets[n]).device, dtype=torch.bool) for n, m in self.masks.items()}
        self._apply_to_weights()  # not while the masks are stochastic
        self._check_ranks_agree(trainer)
        self._log(trainer, self.step)
        log.info("%s on %d targets (%s weights)", self.method, len(self.targets), f"{self.sparsity_report().numel:,}")

    def _context(self, stepped: frozenset[str] | None = None) -> SparsityContext:
        params = {n: local(p) for n, p in self.targets.items()}  # FSDP2: the rank's pieces (ctx.shards says where)
        return SparsityContext(params, self.masks, self._total_steps, self.generator, stepped, self._shards)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shape of every target (a DTensor's ``shape`` is the full one)."""
        return {n: tuple(p.shape) for n, p in self.targets.items()}

    # ----------------------------------------------------------- every step
    def _stochastic(self, step: int) -> bool:
        return self.masks is not None and not self._final and self.method.stochastic(step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = self._batch_start_step = trainer.global_step
        if self._stochastic(step):
            self._batch = (step, batch_idx)
            self._forward = 0
            self._sample(pl_module)
            self._seen = set()
            modules = {id(m): m for m, _, _ in self._swap.owners}
            self._hooks = [m.register_forward_pre_hook(self._on_target_forward) for m in modules.values()]

    def _sample(self, pl_module: pl.LightningModule) -> None:
        """Swap freshly sampled masked weights in: forward ``f`` of batch ``b`` at step ``t`` draws from
        ``derive_seed(seed, t, b)`` (``f = 0``) or ``derive_seed(seed, t, b, f)``."""
        if self.method.straight_through:  # SR-STE: w * mask, the gradient passes to the dense w
            self._swap_in(pl_module, straight_through_masked(self.targets.values(), self.masks.values()))
            return
        step, batch_idx = self._batch
        base, scale = self.method.forward_probabilities(self._context(), step)
        seed = derive_seed(self._seed, step, batch_idx, *([self._forward] if self._forward else []))
        bases = [base[n] for n in self.targets]
        self._swap_in(pl_module, self.sampler.sample(self.targets.values(), self.masks.values(), bases, scale, seed))

    def _on_target_forward(self, module: nn.Module, args) -> None:
        """A module that owns a target runs: a second run in the same batch is a new forward, with a new sample.

        Not during backward: activation checkpointing re-runs modules there, and must see the sample it recomputes.
        """
        if torch._C._current_graph_task_id() != -1:
            return
        if id(module) in self._seen or not self._swap.active:
            self._forward += 1
            self._seen = set()
            self._sample(self._swap.model)
        self._seen.add(id(module))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.masks is None:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        names = self._optimizer_targets.get(id(optimizer), frozenset(n for n, p in self.targets.items() if p.requires_grad))
        upcoming = trainer.global_step + 1
        self._stepped[upcoming] = names
        if self.method.needs_grads(upcoming):  # only targets that really got a gradient from this step
            self._grads[upcoming] = {  # FSDP2: the reduce-scattered (averaged) gradient's local piece
                n: local(p.grad).detach().clone() for n, p in self.targets.items() if n in names and p.grad is not None
            }
        if self.method.skips_optimizer_step(upcoming):  # torch optimizers leave a parameter without grad alone
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        elif self._stochastic(trainer.global_step):  # sampled weights learn: their gradients stay
            named = [(n, p) for n, p in self.targets.items() if n in names and p.grad is not None]
            self.method.regularize_([p.detach() for _, p in named], [p.grad for _, p in named], [self.masks[n] for n, _ in named])
        else:
            pairs = [(local(p.grad), self.masks[n]) for n, p in self.targets.items() if n in names]
            self.kernel([g for g, _ in pairs], [m for _, m in pairs])

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._restore()  # also when the batch had no backward
        self._remove_hooks()
        step = trainer.global_step
        self._check_steps_per_batch(step - self._batch_start_step)
        if step == self.step:  # no optimizer step on this batch (gradient accumulation)
            return
        crossed = range(self.step + 1, step + 1)
        self.step = step
        if self._reapply_every_step:
            self._apply_to_weights()
        for t in crossed:  # several with manual optimization and several optimizers
            if self.method.is_update_step(t):
                self.step = t
                self._update(trainer, t, self._grads.pop(t, None), self._stepped.get(t))
                self._log(trainer, t)
        self.step = step
        self._grads, self._stepped = {}, {}

    def _check_steps_per_batch(self, made: int) -> None:
        """Fractions of training assume ``len(optimizers)`` steps per batch under manual optimization."""
        if self._steps_per_batch > 1 and made != self._steps_per_batch and self.method.uses_fractions():
            raise SparsityConfigError(
                f"a training batch made {made} optimizer steps, but {type(self.method).__name__}'s schedule has "
                f"fractions of training, resolved for {self._steps_per_batch} steps per batch (one per optimizer, "
                "manual optimization): give start/end/every as int numbers of optimizer steps (trainer.global_step)"
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()  # in case a callback ended the epoch between batch start and end
        self._apply_to_weights()
        report = self.sparsity_report()
        # the same value on every rank (identical masks, checked): no collective, so an epoch end with uneven
        # batches across ranks does not wait here
        pl_module.log("sparsity/global", report.global_sparsity, prog_bar=True, sync_dist=False)
        pl_module.log("sparsity/target", self.method.target_sparsity(self.step), sync_dist=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        self._remove_hooks()
        if self.masks is not None and self.targets:  # counted from the weights: also global thresholds (GMP, GraNet)
            kept = {n: layer.numel - layer.zeros for n, layer in self.sparsity_report().layers.items()}
            starved = starved_layers(kept, self._shapes())
            if starved:
                rank_zero_warn(starved_message(starved, "SparsityCallback: at the end of fit"))
        report = self._short_of_target()
        if report is not None and self.finalize == "prune":
            new = self.method.final_masks(self._context())
            if new is not None:
                self._final = True
                self._set_masks(trainer, new, self.step, reset_state=True)
                self._log(trainer, self.step)
                report = self._short_of_target()
                rank_zero_info(f"SparsityCallback(finalize='prune'): pruned to {self.sparsity_report().global_sparsity:.2%}")
        if report is not None:
            rank_zero_warn(
                f"SparsityCallback: training ended after step {self.step} of {self._total_steps or 'an unknown number of'} "
                f"optimizer steps at {report.global_sparsity:.2%} sparsity, below the {self.method.sparsity:.2%} that "
                f"{type(self.method).__name__} aims at (its schedule ends at step {self._schedule_end()}). "
                "Train longer or resume, or pass finalize='prune' to prune to the target at the end of fit."
            )

    def _short_of_target(self) -> SparsityReport | None:
        """The targets' report when they hold fewer zeros than the method's final sparsity, else ``None``."""
        if self.masks is None or not self.targets:
            return None
        report = self.sparsity_report()
        kept = self.method.final_kept(self._shapes())
        return report if report.numel - report.zeros > kept else None

    def _schedule_end(self):
        steps = self.method._steps
        return "?" if steps is None else steps.end

    @torch.no_grad()
    def _apply_to_weights(self) -> None:
        if self.masks is not None and not self._stochastic(self.step):
            self.kernel([local(p) for p in self.targets.values()], self.masks.values())

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

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_start(pl_module)

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_start(pl_module)

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_start(pl_module)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._restore()

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._restore()

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._restore()

    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``trainer.validate/test/predict(ckpt_path=...)``: take the masks (and targets) from the checkpoint."""
        if self._restored is not None and trainer.state.fn != "fit":
            names = self._restored["targets"]
            params = dict(pl_module.named_parameters())
            missing = [n for n in names if n not in params]
            if missing:
                raise SparsityConfigError(f"the checkpoint has masks for {missing[:4]}, which this model does not have")
            self.targets = {n: params[n] for n in names}
            self._shards = _sharding(trainer, self.targets, self.method)
            self._load_restored(self._restored, trainer.ckpt_path)
            self._restored = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        self._remove_hooks()
        # no count under sharding: it is a collective, and the other ranks may be gone
        report = self._short_of_target() if isinstance(exception, KeyboardInterrupt) and self._shards is None else None
        if report is not None:
            rank_zero_warn(
                f"SparsityCallback: interrupted at step {self.step} at {report.global_sparsity:.2%} "
                f"sparsity, below the target {self.method.sparsity:.2%}; resume from a checkpoint to finish the schedule"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        self._remove_hooks()
        self._swap = None

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, step: int, grads: dict[str, Tensor] | None, stepped) -> None:
        nonfinite = self._nonfinite(step, grads)
        new = self.method.update(self._context(stepped), step, grads)
        if new is not None:
            self._set_masks(trainer, new, step, reset_state=not self.method.stochastic(step))
        if nonfinite:  # NaN * 0 is NaN: masked positions of non-finite weights need an explicit 0
            for n in nonfinite:
                local(self.targets[n]).masked_fill_(~self.masks[n], 0.0)

    def _nonfinite(self, step: int, grads: dict[str, Tensor] | None) -> list[str]:
        """Targets whose weight holds NaN/inf (warned once per fit, also for non-finite gradients)."""
        if self.masks is None:
            return []
        names = list(self.targets)
        flags = torch.stack([~torch.isfinite(local(p)).all() for p in self.targets.values()]).tolist()
        bad = [n for n, f in zip(names, flags) if f]
        bad_grads = [n for n, g in (grads or {}).items() if not bool(torch.isfinite(g).all())]
        if (bad or bad_grads) and not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(
                f"SparsityCallback: non-finite values at the update of step {step}: weights in {bad[:4]}, gradients in "
                f"{bad_grads[:4]}. NaN/inf scores rank as the least important: such weights are pruned or dropped first "
                "(and set to 0) and never grown into; counts stay exact. (Warned once per fit.)"
            )
        return bad

    @torch.no_grad()
    def _set_masks(self, trainer: pl.Trainer, new: Masks, step: int, reset_state: bool) -> None:
        new = {n: m.to(device=local(self.targets[n]).device, dtype=torch.bool) for n, m in new.items()}
        if self.masks is not None:
            keep = [self.masks[n] & new[n] for n in self.targets]  # positions active before and after
            if reset_state:  # stochastic masks zero nothing; state resets when they turn hard
                for optimizer in trainer.optimizers:
                    reset_optimizer_state_(optimizer, self.targets.values(), keep)
            self._change_metrics = _mask_change(self.masks, new, keep, self._shards)
        self.masks = new
        self._apply_to_weights()
        self._check_ranks_agree(trainer)

    # -------------------------------------------------------------- reports
    def sparsity_report(self, model: nn.Module | None = None) -> SparsityReport:
        """Zeros counted in every target weight right now.

        ``model``: count in this model's weights instead, the targets chosen by this callback's
        include/exclude settings (e.g. in the launching process after ``strategy="ddp_spawn"``,
        where the trained weights come back into your model but the callback's masks stay in
        the worker processes).
        """
        if model is not None:
            chosen = select_targets(model, self.include, self.exclude, self.dense_first, self.dense_last)
            names = [n for n in self.targets if n in chosen] or [n for n, p in chosen.items() if p.requires_grad]
            return sparsity_report({n: chosen[n] for n in names})
        if not self.targets:
            raise RuntimeError(
                "SparsityCallback has no targets in this process: call trainer.fit first. After a fit with "
                "strategy='ddp_spawn' the masks stay in the worker processes, but the trained weights are back in your "
                "model: use callback.sparsity_report(model)."
            )
        return sparsity_report(self.targets, self._shards)

    def _log(self, trainer: pl.Trainer, step: int) -> None:
        metrics = self.sparsity_report().metrics(per_layer=self.log_per_layer)
        metrics["sparsity/target"] = self.method.target_sparsity(step)
        metrics.update({k: v for k, v in self._change_metrics.items() if self.log_per_layer or k.endswith("/global")})
        metrics.update(self.method.last_metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ DDP
    def _check_ranks_agree(self, trainer: pl.Trainer) -> None:
        """A 63-bit hash per mask, compared with one MAX all-reduce of ``[h, -h]``: O(layers) bytes, any world size.

        Sharded masks differ across ranks by design: then what every rank must share is compared instead, the
        step, the seed and the generator's state (every random decision). (Counts need no check: every rank
        gets them from the same all-reduce.)
        """
        if trainer.world_size <= 1 or self.masks is None:
            return
        if self._shards is not None:
            state = zlib.crc32(bytes(self.generator.get_state().numpy()))
            shared = torch.tensor([self.step, self._seed or 0, state], dtype=torch.int64)
            if compare_across_ranks(shared, trainer.strategy):
                raise RuntimeError(
                    f"SparsityCallback: the ranks disagree at step {self.step} about the step, seed or generator state "
                    "of the sharded masks; every rank must run the same updates"
                )
            return
        bad = compare_across_ranks(mask_hashes(list(self.masks.values())), trainer.strategy)
        if bad:
            names = [n for i, n in enumerate(self.masks) if i in bad]
            raise RuntimeError(
                f"sparsity masks differ across DDP ranks at step {self.step} in {names}; every rank must see "
                "identical weights and all-reduced gradients (is a target outside DDP's gradient sync?)"
            )

    # ----------------------------------------------------------- checkpoint
    def _config(self) -> dict:
        """What a resume must share with the run that wrote the checkpoint (plain values only)."""
        selection = dict(include=self.include, exclude=self.exclude, dense_first=self.dense_first, dense_last=self.dense_last)
        config = {f"{type(self.method).__name__}.{k}": v for k, v in self.method.hparams().items()}
        config.update({f"SparsityCallback.{k}": v for k, v in selection.items()})
        return {k: _plain(v) for k, v in config.items() if _plain(v) is not _NOT_PLAIN}

    @override
    def state_dict(self) -> dict:
        sharded = self._shards is not None and self.masks is not None  # then the masks go in on_save_checkpoint
        return {
            "targets": list(self.targets),
            "masks": None if self.masks is None or sharded else {n: m.detach().cpu() for n, m in self.masks.items()},
            "sharded": sharded,
            "method": self.method.state_dict(),
            "method_name": type(self.method).__name__,
            "config": self._config(),
            "generator": self.generator.get_state(),
            "seed": self._seed,
            "step": self.step,
        }

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict  # applied in on_fit_start (or on_train_start under FSDP2), once the targets are known

    # Sharded masks. Callback state is rank 0's copy on every rank, so the pieces cannot go there. With a
    # distributed checkpoint (a folder, ModelParallelStrategy's default) each rank's bit-packed rows ride along
    # in checkpoint["state_dict"] as DTensors laid out like their weight: written by each rank, resharded by
    # torch.distributed.checkpoint, ignored by Lightning's model load, read back in on_train_start. With a
    # single-file checkpoint (save_distributed_checkpoint=False) the packed rows are gathered into the state.
    def _mask_key(self, name: str) -> str:
        return f"{MASK_PREFIX}{self.state_key}.{name}"

    def _packed_dtensor(self, name: str, packed_local: Tensor):
        from torch.distributed.tensor import DTensor

        p, width = self.targets[name], packed_local.shape[1]
        shape = (p.shape[0] if p.dim() else 1, width)
        return DTensor.from_local(packed_local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=(width, 1))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._shards is None or self.masks is None:
            return
        pieces = {n: self._packed_dtensor(n, pack_rows(m)) for n, m in self.masks.items()}
        if getattr(trainer.strategy, "_save_distributed_checkpoint", True):
            checkpoint["state_dict"].update({self._mask_key(n): d for n, d in pieces.items()})
        else:  # one file, written by rank 0: 1 bit per weight (every rank takes part in the gather)
            packed = {n: d.full_tensor().cpu() for n, d in pieces.items()}
            checkpoint["callbacks"][self.state_key]["packed_masks"] = packed

    def _restored_masks(self, state: dict, ckpt_path) -> Masks | None:
        """The checkpoint's masks as this rank holds them (its rows under FSDP2)."""
        if state.get("sharded") and state.get("packed_masks") is None:  # pieces in the distributed checkpoint
            import torch.distributed.checkpoint as dcp

            templates = {
                self._mask_key(n): self._packed_dtensor(n, pack_rows(torch.zeros_like(local(p), dtype=torch.bool)))
                for n, p in self.targets.items()
            }
            dcp.load({"state_dict": templates}, checkpoint_id=ckpt_path)
            return {n: unpack_rows(templates[self._mask_key(n)].to_local(), tuple(local(p).shape)) for n, p in self.targets.items()}
        masks = state["masks"]
        if state.get("packed_masks") is not None:
            shapes = self._shapes()
            masks = {n: unpack_rows(b, shapes[n]) for n, b in state["packed_masks"].items()}
        if masks is not None and self._shards is not None:  # full masks: keep this rank's rows
            pieces = self._shards.pieces
            masks = {n: m[pieces[n].start : pieces[n].stop] for n, m in masks.items()}
        return masks

    # A torch.Generator pickles its state as a temporary tensor, which torch.multiprocessing
    # (ddp_spawn) shares by file descriptor and frees before the child reads it; send bytes.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["generator"] = bytes(self.generator.get_state().numpy())
        state["_swap"] = None  # refers to the model
        state["_hooks"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)

    def _load_restored(self, state: dict, ckpt_path) -> None:
        if state["method_name"] != type(self.method).__name__:
            raise SparsityConfigError(
                f"the checkpoint was written by method {state['method_name']}, but this callback runs "
                f"{type(self.method).__name__}; resume with the same method"
            )
        has_masks = state["masks"] is not None or state.get("sharded")
        if has_masks and list(state["targets"]) != list(self.targets):
            raise SparsityConfigError(
                f"the checkpoint has masks for targets {list(state['targets'])[:4]}... but this model's targets are "
                f"{list(self.targets)[:4]}...; resume with the same model and include/exclude settings"
            )
        saved, now = state.get("config") or {}, self._config()  # checkpoints before 0.2 hold no config
        if saved:  # an argument newer than the checkpoint: the checkpoint ran with its default
            name = type(self.method).__name__
            saved = {**{f"{name}.{k}": _plain(v) for k, v in self.method.defaults().items() if f"{name}.{k}" in now}, **saved}
        changed = [k for k in {**saved, **now} if saved and saved.get(k) != now.get(k)]
        if changed:
            changes = "; ".join(f"{k}: was {saved.get(k)!r}, now {now.get(k)!r}" for k in changed)
            if self.on_config_change == "error":
                raise SparsityConfigError(
                    f"the checkpoint was written with another sparsity configuration ({changes}). Resume with the "
                    "configuration of the checkpoint, or pass SparsityCallback(on_config_change='continue') to train on "
                    "from its masks with the new one"
                )
            rank_zero_warn(f"SparsityCallback(on_config_change='continue'): resuming with a changed configuration ({changes})")
        masks = self._restored_masks(state, ckpt_path)
        self.masks = None if masks is None else {n: m.to(local(self.targets[n]).device) for n, m in masks.items()}
        self.method.load_state_dict(state["method"])
        self.generator.set_state(state["generator"])
        self._seed, self.step = state["seed"], state["step"]


_NOT_PLAIN = object()


def _plain(value):
    """``value`` as plain Python (numbers, strings, lists, dicts), or ``_NOT_PLAIN`` (tensors, objects)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, dict):
        items = {str(k): _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN


def _mask_change(old: Masks, new: Masks, kept: list[Tensor], shards: Shards | None) -> dict[str, float]:
    """Fraction of the new active weights that were not active before, per layer and global."""
    both = total_counts({**{("new", n): m for n, m in new.items()}, **{("kept", n): k for n, k in zip(new, kept)}}, shards)
    active = {n: both["new", n] for n in new}
    grown = {n: active[n] - both["kept", n] for n in new}
    metrics = {f"sparsity/mask_change/{n}": grown[n] / max(active[n], 1) for n in new}
    metrics["sparsity/mask_change/global"] = sum(grown.values()) / max(sum(active.values()), 1)
    return metrics


def _sharding(trainer: pl.Trainer, targets: dict[str, Tensor], method: SparsityMethod) -> Shards | None:
    """The layout of sharded targets (FSDP2 ``fully_shard``), ``None`` when they are whole; what cannot be made
    right under sharding fails here, at fit start."""
    strategy = type(trainer.strategy).__name__
    if strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
        raise SparsityConfigError(
            f"strategy={strategy} is not supported: it flattens the parameters into shards of its own, so masks, counts "
            "and selections would be per shard. Allowed: single-device, DDP ('ddp', 'ddp_spawn', multi-node) and FSDP2 "
            "through ModelParallelStrategy(tensor_parallel_size=1) with fully_shard in configure_model(); see docs/distributed.md"
        )
    shards = Shards.of(targets)
    if shards is not None and type(method).stochastic is not SparsityMethod.stochastic:
        raise SparsityConfigError(
            f"{type(method).__name__} swaps sampled or straight-through weights into the modules at every forward, which "
            "FSDP2's all-gather of the sharded parameters does not see: it is not supported with sharded parameters. "
            "Allowed under FSDP2: Static, GMP, RigL, SET, GraNet, FixedMasks (lottery tickets); or train with DDP"
        )
    return shards

