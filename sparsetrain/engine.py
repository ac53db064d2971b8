"""``SparsityEngine``: everything a sparse run does to a model, in plain torch.

The engine owns what a sparse run is (the targets, their masks, the method, the step counter, the seeded
generator, the shard layout, the mask kernels) and does all the work on weights, gradients and optimizer
state. A training loop only says *when*, through a few calls (each adapter in :mod:`sparsetrain.integrations`
and :class:`sparsetrain.SparsityCallback` is such a loop):

====================================  ==================================================================
``setup(model, optimizers, total)``   at the start of training, once the model is final: choose the
                                      targets, resolve the schedule, check the configuration
``begin(step)``                       then: masks from a loaded state, the previous run or the method
``before_optimizer_step(opt, step)``  before optimizer step ``step`` (gradients final, unscaled): copy
                                      the gradients an update needs, zero those of masked weights
``advance(step)``                     after the steps up to ``step``: run the updates due (new masks to
                                      weights, gradients, optimizer state and weight copies)
``begin_training_forwards(model,..)`` / ``restore()`` / ``swap_in_evaluation(model)``: the forward-time
                                      weights of stochastic and straight-through methods
``enforce(where)``                    where weights change hands (evaluation, checkpoints, the end):
                                      the invariant "zero at every masked position", restored and reported
``finish()``                          at the end of training: below the final sparsity, warn or prune
``state_dict()``/``load_state_dict``  the whole run, exactly resumable (:mod:`sparsetrain.checkpoint`)
====================================  ==================================================================

The invariant. The engine does not assume it is the only code that writes the weights: it follows the
optimizers' live ``param_groups`` at every step (a group added during training is masked from its first step),
masks the weight copies it is told about (``engine.copies``: an EMA/SWA average, masked at every mask change, so
that an average of masked weights stays exactly masked), and :meth:`enforce` checks the targets at the boundaries
where weights change hands, re-applies the masks and names what it found. Metrics (``sparsity/global``,
``sparsity/target``, ``sparsity/layer/<name>``, ``sparsity/mask_change/*``) are queued in ``engine.metrics`` as
``(step, dict)`` for the loop to send to its loggers.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from sparsetrain import checkpoint
from sparsetrain.core import distributed
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.fingerprint import compare_across_ranks, mask_hashes
from sparsetrain.core.kernels import MaskKernel
from sparsetrain.core.layouts import Layout, target_layouts
from sparsetrain.core.masks import Masks, keeps_masked_weights_zero, reset_optimizer_state_
from sparsetrain.core.report import SparsityReport, sparsity_report
from sparsetrain.core.shards import Shards, local, total_counts
from sparsetrain.core.starved import starved_layers, starved_message
from sparsetrain.core.stochastic import ParameterSwap, StochasticKernel, derive_seed, straight_through_masked
from sparsetrain.core.targets import TargetSelection, clean_name
from sparsetrain.core.validation import check_choice, check_int
from sparsetrain.methods import method_from_name
from sparsetrain.methods.base import SparsityContext, SparsityMethod, methods_supporting

COMPUTE = ("masked", "sparse", "auto")
CONFIG_CHANGES = ("error", "continue")
FINALIZE = ("warn", "prune")
REAPPLY = ("auto", "always")
ALREADY_SPARSE = 0.1  # a model whose targets hold this share of exact zeros at the start is "already sparse"

log = logging.getLogger(__name__)


def _info(message: str) -> None:
    if distributed.rank() == 0:
        log.info(message)


def _warn(message: str) -> None:
    if distributed.rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


def build_method(method: SparsityMethod | str, method_args: dict) -> SparsityMethod:
    """``method`` itself, or the registered method of that name built with ``method_args``."""
    if isinstance(method, str):
        return method_from_name(method, **method_args)
    if method_args:
        raise SparsityConfigError(
            f"{', '.join(method_args)}: method arguments go with a method name, e.g. "
            f"SparsityCallback('rigl', sparsity=0.9); {type(method).__name__} is already built"
        )
    if not isinstance(method, SparsityMethod):
        raise SparsityConfigError(
            f"method={method!r} is not a sparsity method; pass one of sparsetrain.methods "
            "(Dense, Static, GMP, ...) or its name ('gmp', 'rigl', ...)"
        )
    return method


def check_sharding(targets: dict[str, Tensor], method: SparsityMethod) -> Shards | None:
    """The layout of sharded targets (FSDP2 ``fully_shard``), ``None`` when they are whole; a method that cannot
    run on sharded targets fails here, at the start."""
    shards = Shards.of(targets)
    if shards is not None and "soft_masks" in method.supports:
        raise SparsityConfigError(
            f"{type(method).__name__} swaps sampled or straight-through weights into the modules at every forward, which "
            "FSDP2's all-gather of the sharded parameters does not see: it is not supported with sharded parameters. "
            f"Allowed under FSDP2: {', '.join(methods_supporting('sharding'))}; or train with DDP"
        )
    return shards


class SparsityEngine:
    """Makes the targets of a model sparse while it trains, driven by any training loop (module docstring).

    Args:
        method: a :class:`~sparsetrain.methods.base.SparsityMethod`, or its registered name with its arguments
            as further keywords: ``SparsityEngine("rigl", sparsity=0.9, every=100)``.
        include, exclude, dense_first, dense_last: the targets (:class:`~sparsetrain.core.targets.TargetSelection`).
        seed: seed of the generator for random masks; ``None`` takes ``torch.initial_seed()`` from rank 0.
        log_per_layer: also report the sparsity of every target.
        reapply: ``auto`` or ``always``: multiply the weights by their masks after every optimizer step
            (``auto``: only when an optimizer may move a zero weight with a zero gradient, see
            :data:`~sparsetrain.core.masks.ZERO_PRESERVING_OPTIMIZERS`).
        kernel: ``auto``, ``eager`` or ``compiled``: how masks are multiplied (:mod:`sparsetrain.core.kernels`).
        on_config_change: ``error`` or ``continue``: a loaded state written with another configuration.
        finalize: ``warn`` or ``prune``: training that ends below the method's final sparsity.
        compute: ``masked`` (dense kernels on weights with zeros: the default), ``sparse`` (every target layer
            that can runs its forward and backward on sparse kernels with the mask's pattern; the others are
            named at the start) or ``auto`` (only the layers measured faster that way, timed at their first
            forward). See :mod:`sparsetrain.core.sparse` and docs/sparse_compute.md.
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
        self.method = build_method(method, method_args)
        self.compute = check_choice(compute, "compute", COMPUTE)
        if self.compute != "masked" and "soft_masks" in self.method.supports:
            raise SparsityConfigError(
                f"compute={compute!r} runs hard masks on sparse kernels; {type(self.method).__name__} computes with sampled "
                "or straight-through weights until its masks turn hard: use compute='masked' with it"
            )
        self.selection = TargetSelection(include, exclude, dense_first, dense_last)
        self.seed = None if seed is None else check_int(seed, "seed", meaning="seed of the mask generator, or None")
        self.log_per_layer = log_per_layer
        self.reapply = check_choice(reapply, "reapply", REAPPLY)
        self.on_config_change = check_choice(on_config_change, "on_config_change", CONFIG_CHANGES)
        self.finalize = check_choice(finalize, "finalize", FINALIZE)
        self.kernel = MaskKernel(kernel)
        self.sampler = StochasticKernel(kernel)
        # the run
        self.targets: dict[str, Tensor] = {}
        self.masks: Masks | None = None
        self.step = 0
        self.generator = torch.Generator()
        self.run_seed: int | None = None
        self.total_steps: int | None = None
        self.shards: Shards | None = None  # FSDP2: where each target's local piece lies (core/shards.py)
        self.layouts: dict[str, Layout] | None = None  # how each target enters its layer (core/layouts.py)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.copies: list[nn.Module] = []  # weight copies others keep (EMA/SWA averages): masked with the model
        self.sparse = None  # compute="sparse"|"auto": the SparseCompute running the target layers (core/sparse)
        self._model = None  # the model, from setup until the sparse kernels are attached to it
        self._sparse_table_logged = False
        self.metrics: list[tuple[int, dict[str, float]]] = []  # (step, metrics) for the loop's loggers
        self.on_metrics: Callable[[int, dict[str, float]], None] | None = None  # instead of the queue
        self.handles: list = []  # hooks a loop registered (sparsetrain.attach), removed by detach()
        self.inform: Callable[[str], None] = _info
        # parked between calls
        self._loaded: dict | None = None  # a state from load_state_dict, applied by begin()
        self._loaded_path, self._loaded_key = None, ""  # where it came from (a distributed checkpoint folder)
        self._previous: dict[str, Tensor] = {}  # the previous run's targets, until begin()
        self._grads: dict[int, dict[str, Tensor]] = {}  # by the step whose update needs them
        self._masked_here: dict[str, tuple[int, int] | None] = {}  # gradients mask_gradients() masked: (id, version)
        self._stepped: dict[int, frozenset[str]] = {}  # targets trained by the optimizer of each step
        self._change_metrics: dict[str, float] = {}
        self._final = False  # finalize="prune" made the masks hard early
        self._warned_nonfinite = False
        self._reapply_every_step = True
        # forward-time weights of stochastic / straight-through methods
        self._swap: ParameterSwap | None = None
        self._hooks: list = []  # forward pre-hooks on target owners, only while training forwards sample
        self._sample_key: tuple[int, int] = (0, 0)  # (step, batch) of the forwards that sample
        self._forward = 0  # forwards sampled under that key, minus one
        self._seen: set[int] = set()  # target-owning modules that ran in the current forward

    # ------------------------------------------------------------------ start
    def setup(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], total_steps: int | None = None) -> None:
        """Choose the targets of ``model`` (final: built, wrapped, sharded) and check the configuration.

        ``optimizers``: those that train the model (targets are the default prunable weights that one of them
        trains, plus explicit includes). ``total_steps``: all optimizer steps of the run (what fractions of
        training refer to), ``None`` if unknown. Call :meth:`begin` next.
        """
        self._previous = self.targets
        self.optimizers = list(optimizers)
        self.targets = self._select(model)
        self.layouts = target_layouts(model, self.targets)
        self.shards = check_sharding(self.targets, self.method)
        self.total_steps = total_steps
        self.method.setup(total_steps)
        self.method.check(self.shapes, self.layouts)
        self._final = False
        self._grads, self._stepped = {}, {}
        self._reapply_every_step = self.reapply == "always" or not all(keeps_masked_weights_zero(o) for o in self.optimizers)
        self.stop_sparse_compute()
        self._model = model if self.compute != "masked" else None

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer that trains targets and was not known at :meth:`setup` (found at its first step)."""
        self.optimizers.append(optimizer)
        self._reapply_every_step = self._reapply_every_step or not keeps_masked_weights_zero(optimizer)

    def _select(self, model: nn.Module) -> dict[str, Tensor]:
        targets = self.selection.select(model)
        trained = self._in_optimizers()
        untrained = [
            n for n, p in targets.items()
            if (not p.requires_grad or (trained and id(p) not in trained)) and not self.selection.includes(n)
        ]  # fmt: skip
        if untrained:
            self.inform(
                f"sparsetrain: {len(untrained)} weights are frozen or in no optimizer and stay dense (not targets): "
                f"{', '.join(untrained[:8])}{', ...' if len(untrained) > 8 else ''}. Name them in include= to prune them anyway."
            )
            targets = {n: p for n, p in targets.items() if n not in untrained}
        if not targets:
            raise SparsityConfigError(
                f"{type(model).__name__} has no prunable weights that an optimizer trains: every default target is "
                "frozen or in no optimizer. Name the parameters to prune with `include` (globs on parameter names)."
            )
        return targets

    def _in_optimizers(self) -> set[int]:
        return {id(p) for o in self.optimizers for g in o.param_groups for p in g["params"]}

    def begin(self, step: int = 0) -> None:
        """The masks of this run: a loaded state's, the previous run's (the same model trained on), or new ones."""
        previous, self._previous = self._previous, {}
        loaded, self._loaded = self._loaded, None
        if loaded is not None and checkpoint.started(loaded):
            self._load(loaded, self._loaded_path)
            if not loaded.get("soft", "soft_masks" in self.method.supports):  # soft masks leave the weights dense
                self._check_weights_belong_to(self._loaded_path)
        elif self.masks is not None and list(previous) == list(self.targets) and all(previous[n] is p for n, p in self.targets.items()):
            self.step = step
            self.inform(
                f"sparsetrain: a new fit of the same model continues from the masks of the previous fit "
                f"({self.report().global_sparsity:.2%} sparse); the schedule restarts at step {self.step}. "
                "Use a new SparsityCallback (a new engine) to start from fresh masks."
            )
        else:
            if loaded is not None:  # saved before its run started (a Lightning tuner's restore): a fresh start
                self.method.load_state_dict(loaded["method"])
            self.run_seed = distributed.broadcast_int(self.seed if self.seed is not None else torch.initial_seed() % (2**63))
            self.generator.manual_seed(self.run_seed)
            self.step = step
            before = self.report()
            self.masks = self._on_devices(self.method.init_masks(self.context()))
            self._warn_if_sparse_weights_lost(before)
            if self.masks is not None and not self.stochastic():  # state from steps before the masks (dense steps)
                for optimizer in self.optimizers:
                    reset_optimizer_state_(optimizer, self.targets.values(), self.masks.values())
        self.apply_masks()  # not while the masks are stochastic
        for copy in self.copies:
            self.mask_copy(copy)
        self._check_ranks_agree()
        self._start_sparse_compute()
        self._queue_metrics(self.step)
        log.info("%s on %d targets (%s weights)", self.method, len(self.targets), f"{self.report().numel:,}")

    def _on_devices(self, masks: Masks | None) -> Masks | None:
        if masks is None:
            return None
        return {n: m.to(device=local(self.targets[n]).device, dtype=torch.bool) for n, m in masks.items()}

    def _warn_if_sparse_weights_lost(self, before: SparsityReport) -> None:
        """A model that is already sparse (say, loaded from a sparse run) and new masks that zero its weights."""
        if self.masks is None or before.global_sparsity < ALREADY_SPARSE or self.stochastic():
            return
        lost = sum(self._nonzero_where_pruned().values())
        if lost:
            _warn(
                f"sparsetrain: the model is already {before.global_sparsity:.2%} sparse at the start, and the new "
                f"masks of {type(self.method).__name__} zero {lost:,} of its {before.numel - before.zeros:,} non-zero "
                "weights (their per-layer counts do not fit the budget). To go on from a sparse model: resume its run "
                "with ckpt_path=..., keep its masks with FixedMasks(load_masks(checkpoint)), or choose a budget "
                "that holds them (random initial masks keep the non-zero weights first; see docs/rules.md)"
            )

    def context(self, stepped: frozenset[str] | None = None) -> SparsityContext:
        params = {n: local(p) for n, p in self.targets.items()}  # FSDP2: the rank's pieces (ctx.shards says where)
        return SparsityContext(params, self.masks, self.total_steps, self.generator, stepped, self.shards, self.layouts)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shape of every target (a DTensor's ``shape`` is the full one)."""
        return {n: tuple(p.shape) for n, p in self.targets.items()}

    # ------------------------------------------------------------- every step
    def stochastic(self, step: int | None = None) -> bool:
        """Whether the masks are soft after step ``step`` (default: now): forwards see swapped-in weights."""
        return self.masks is not None and not self._final and self.method.stochastic(self.step if step is None else step)

    def trained_by(self, optimizer: torch.optim.Optimizer) -> frozenset[str]:
        """The targets ``optimizer`` trains now (its live ``param_groups``: a group added during training counts)."""
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        return frozenset(n for n, p in self.targets.items() if p.requires_grad and id(p) in ids)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int | None = None, grad_scale: Tensor | float = 1.0) -> None:
        """Before ``optimizer`` makes step ``step`` (default ``self.step + 1``), with its final gradients.

        ``grad_scale``: the factor the gradients still carry (a fused optimizer under ``GradScaler`` unscales
        inside its step): the copies an update needs are divided by it, SR-STE's decay term multiplied.
        """
        if self.masks is None:
            return
        step = self.step + 1 if step is None else step
        names = self._stepped[step] = self.trained_by(optimizer)
        if step in self._grads:  # copied by mask_gradients() before the loop clipped: this optimizer's targets
            self._grads[step] = {n: g for n, g in self._grads[step].items() if n in names}
        else:
            self._copy_grads(step, names, grad_scale)
        if self.method.skips_optimizer_step(step):  # torch optimizers leave a parameter without grad alone
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        elif self.stochastic(step - 1):  # sampled weights learn: their gradients stay
            named = [(n, p) for n, p in self.targets.items() if n in names and p.grad is not None]
            weights = [p.detach() if isinstance(grad_scale, float) and grad_scale == 1.0 else p.detach() * grad_scale for _, p in named]
            self.method.regularize_(weights, [p.grad for _, p in named], [self.masks[n] for n, _ in named])
        else:
            self._zero_masked_grads(names)

    def _copy_grads(self, step: int, names: Iterable[str], grad_scale: Tensor | float = 1.0) -> None:
        """Keep the gradients the update of ``step`` ranks by (RigL, GraNet: also at pruned positions), before
        anything masks them (added to what is kept for ``step``); only targets that really got a gradient."""
        if not self.method.needs_grads(step):
            return
        scaled = not isinstance(grad_scale, float) or grad_scale != 1.0
        self._grads.setdefault(step, {}).update({  # FSDP2: the reduce-scattered (averaged) gradient's local piece
            n: local(p.grad).detach() / grad_scale if scaled else local(p.grad).detach().clone()
            for n, p in self.targets.items() if n in names and p.grad is not None
        })  # fmt: skip

    def mask_gradients(self, names: Iterable[str] | None = None) -> None:
        """Zero the gradients of masked weights (of ``names``, default all targets) in one fused pass.

        Called by a loop before it clips (``attach``'s users: ``engine.mask_gradients()`` then
        ``clip_grad_norm_``), the gradients an update of the coming step ranks by are kept first.
        """
        if self.masks is None or self.stochastic():
            return
        names = list(self.targets if names is None else names)
        step, masked = self.step + 1, self._masked_here
        copied = self._grads.get(step, {})
        # a gradient this call masked before, unchanged since (no backward, no zero_grad), is already masked
        self._copy_grads(step, [n for n in names if not (n in copied and masked.get(n) == _identity(self.targets[n].grad))])
        self._zero_masked_grads(names)
        masked.update({n: _identity(self.targets[n].grad) for n in names})

    def _zero_masked_grads(self, names: Iterable[str]) -> None:
        if self.sparse is not None:  # the sparse kernels write exact zeros at pruned positions themselves
            names = set(names) & set(self.sparse.grads_to_mask())
        self.kernel([local(self.targets[n].grad) for n in self.targets if n in names], [self.masks[n] for n in self.targets if n in names])

    def advance(self, step: int) -> None:
        """The optimizer steps up to ``step`` are done: re-apply the masks if an optimizer may have moved a zero,
        and run the update of every step crossed (several with several optimizers), each with the gradients its
        own optimizer stepped with, moving only the targets that optimizer trains."""
        if step == self.step:
            return
        if not self.targets:  # not started: steps before the run (a Lightning tuner's trial steps)
            self.step = step
            return
        crossed = range(self.step + 1, step + 1)
        self.step = step
        if self._reapply_every_step:
            self.apply_masks()
        for t in crossed:
            if self.method.is_update_step(t) and self.method.needs_grads(t) and t not in self._grads:
                self.inform(f"sparsetrain: no optimizer stepped at step {t} (a skipped AMP step?): its update is skipped")
            elif self.method.is_update_step(t):
                self.step = t
                self._update(t, self._grads.pop(t, None), self._stepped.get(t))
                self._queue_metrics(t)
        self.step = step
        self._grads, self._stepped = {}, {}
        self._sparse_grads_for_next_step()
        if self.sparse is not None and not self._sparse_table_logged:  # auto decides at the first forward
            self._sparse_table_logged = True
            self.inform(f"sparsetrain (compute={self.compute!r}): the kernels of the target layers\n{self.sparse_compute_table()}")

    @torch.no_grad()
    def _update(self, step: int, grads: dict[str, Tensor] | None, stepped) -> None:
        nonfinite = self._nonfinite(step, grads)
        new = self.method.update(self.context(stepped), step, grads)
        if new is not None:
            self.set_masks(new, reset_state=not self.method.stochastic(step))
        if nonfinite:  # NaN * 0 is NaN: masked positions of non-finite weights need an explicit 0
            for n in nonfinite:
                local(self.targets[n]).masked_fill_(~self.masks[n], 0.0)

    def _nonfinite(self, step: int, grads: dict[str, Tensor] | None) -> list[str]:
        """Targets whose weight holds NaN/inf (warned once per run, also for non-finite gradients)."""
        if self.masks is None:
            return []
        names = list(self.targets)
        flags = torch.stack([~torch.isfinite(local(p)).all() for p in self.targets.values()]).tolist()
        bad = [n for n, f in zip(names, flags) if f]
        bad_grads = [n for n, g in (grads or {}).items() if not bool(torch.isfinite(g).all())]
        if (bad or bad_grads) and not self._warned_nonfinite:
            self._warned_nonfinite = True
            _warn(
                f"sparsetrain: non-finite values at the update of step {step}: weights in {bad[:4]}, gradients in "
                f"{bad_grads[:4]}. NaN/inf scores rank as the least important: such weights are pruned or dropped first "
                "(and set to 0) and never grown into; counts stay exact. (Warned once per fit.)"
            )
        return bad

    @torch.no_grad()
    def set_masks(self, new: Masks, reset_state: bool = True) -> None:
        """New masks: zero the weights (and the weight copies) they prune and, with ``reset_state``, the optimizer
        state of every position whose mask changed (grown weights start at 0 with zero momentum/moments)."""
        new = self._on_devices(new)
        if self.masks is not None:
            keep = [self.masks[n] & new[n] for n in self.targets]  # positions active before and after
            if reset_state:  # stochastic masks zero nothing; state resets when they turn hard
                for optimizer in self.optimizers:
                    reset_optimizer_state_(optimizer, self.targets.values(), keep)
            self._change_metrics = _mask_change(self.masks, new, keep, self.shards)
        self.masks = new
        self.apply_masks()
        for copy in self.copies:
            self.mask_copy(copy)
        self._check_ranks_agree()
        if self.sparse is not None:
            self.sparse.update_masks(self.masks)
        else:
            self._start_sparse_compute()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Multiply every target by its mask in one fused pass (not while the masks are soft)."""
        if self.masks is not None and not self.stochastic():
            self.kernel([local(p) for p in self.targets.values()], self.masks.values())

    @torch.no_grad()
    def mask_copy(self, copy: nn.Module) -> int:
        """Multiply the targets' namesakes in ``copy`` (an averaged model, same parameter names) by the masks;
        returns how many non-zero weights that removed. Nothing while the masks are soft."""
        if self.masks is None or self.stochastic():
            return 0
        params = {clean_name(n): p for n, p in copy.named_parameters()}
        pairs = [(local(params[n]), m) for n, m in self.masks.items() if n in params and params[n] is not self.targets[n]]
        found = sum(int((t.ne(0) & ~m).sum()) for t, m in pairs)
        self.kernel([t for t, _ in pairs], [m for _, m in pairs])
        return found

    # ----------------------------------------------------------- sparse compute
    def _start_sparse_compute(self) -> None:
        """``compute="sparse"|"auto"``: once there are hard masks, run the target layers on sparse kernels."""
        if self._model is None or self.masks is None or self.stochastic():
            return
        from sparsetrain.core.sparse import SparseCompute

        self.sparse = SparseCompute(self._model, self.targets, self.masks, self.compute)
        self._model, self._sparse_table_logged = None, False
        self._sparse_grads_for_next_step()
        refused = self.sparse.refused
        self.inform(
            f"sparsetrain (compute={self.compute!r}): {len(self.sparse.layers)} of {len(self.targets)} targets may run on sparse "
            f"kernels{'; masked: ' + '; '.join(f'{n} ({why})' for n, why in refused.items()) if refused else ''}"
        )

    def _sparse_grads_for_next_step(self) -> None:
        """The backward before an update that ranks pruned positions by gradient (RigL, GraNet) gives dense
        gradients: set before the forwards of the next optimizer steps (one per optimizer: a batch of a GAN makes
        one step per optimizer)."""
        if self.sparse is not None:
            ahead = range(self.step + 1, self.step + 1 + max(1, len(self.optimizers)))
            self.sparse.dense_weight_grads(any(self.method.needs_grads(t) for t in ahead))

    def sparse_compute_table(self) -> str:
        """What runs each target layer (``compute="sparse"|"auto"``): a plain-text table, one row per target."""
        rows = [] if self.sparse is None else self.sparse.table()
        if not rows:
            return ""
        columns = [c for c in rows[0] if any(c in r for r in rows)] + sorted({c for r in rows for c in r} - set(rows[0]))
        lines = ["  ".join(columns)] + ["  ".join(str(r.get(c, "")) for c in columns) for r in rows]
        return "\n".join(lines)

    def stop_sparse_compute(self) -> None:
        """Back to dense kernels on the masked weights (hooks removed, patterns freed)."""
        if self.sparse is not None:
            self.sparse.detach()
            self.sparse = None

    # ------------------------------------------------ forward-time weights
    def begin_training_forwards(self, model: nn.Module, key: tuple[int, int]) -> None:
        """Soft masks: swap sampled (or straight-through) weights into ``model`` for its training forwards under
        ``key`` (``(step, batch)``): forward ``f`` draws from ``derive_seed(seed, *key, f)`` (``f = 0``: no
        ``f``), and a module that owns a target running a second time starts the next forward."""
        if not self.stochastic():
            return
        self._sample_key, self._forward, self._seen = key, 0, set()
        self._sample(model)
        modules = {id(m): m for m, _, _ in self._swap.owners}
        self._hooks = [m.register_forward_pre_hook(self._on_target_forward) for m in modules.values()]

    def _sample(self, model: nn.Module) -> None:
        if self.method.straight_through:  # SR-STE: w * mask, the gradient passes to the dense w
            self._swap_in(model, straight_through_masked(self.targets.values(), self.masks.values()))
            return
        step = self._sample_key[0]
        base, scale = self.method.forward_probabilities(self.context(), step)
        seed = derive_seed(self.run_seed, *self._sample_key, *([self._forward] if self._forward else []))
        bases = [base[n] for n in self.targets]
        self._swap_in(model, self.sampler.sample(self.targets.values(), self.masks.values(), bases, scale, seed))

    def _on_target_forward(self, module: nn.Module, args) -> None:
        """Not during backward: activation checkpointing re-runs modules there, and must see the sample it recomputes."""
        if torch._C._current_graph_task_id() != -1:
            return
        if id(module) in self._seen or not self._swap.active:
            self._forward += 1
            self._seen = set()
            self._sample(self._swap.model)
        self._seen.add(id(module))

    def swap_in_evaluation(self, model: nn.Module) -> None:
        """Soft masks: evaluation forwards see the target network ``w * mask``."""
        if self.stochastic():
            self._swap_in(model, self.sampler.deterministic(self.targets.values(), self.masks.values()))

    def _swap_in(self, model: nn.Module, tensors: list[Tensor]) -> None:
        if self._swap is None or self._swap.model is not model:
            self._swap = ParameterSwap(model, self.targets)
        self._swap.swap_in(tensors)

    def restore(self) -> None:
        """Put the parameters back into their modules (after the backward of the forwards that sampled)."""
        if self._swap is not None:
            self._swap.restore()

    def end_forwards(self) -> None:
        """:meth:`restore`, and remove the forward hooks of :meth:`begin_training_forwards`."""
        self.restore()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------- invariant
    @torch.no_grad()
    def _nonzero_where_pruned(self) -> dict[str, int]:
        """Per target, the weights that are non-zero at positions its mask prunes (summed over FSDP2 ranks)."""
        return total_counts({n: local(p).ne(0) & ~self.masks[n] for n, p in self.targets.items()}, self.shards)

    @torch.no_grad()
    def enforce(self, where: str, writers: Sequence[str] = ()) -> int:
        """The invariant: every masked weight of the model and of its weight copies is exactly 0.

        Counts the non-zero weights at masked positions (one pass over the targets), zeroes them, and warns
        naming ``where``, the layers and the ``writers`` that may have written them (other components of the
        loop). Returns the count. Nothing while the masks are soft. Call it where weights change hands:
        evaluation start, checkpoint save, the end of training.
        """
        if self.masks is None or self.stochastic():
            return 0
        found = self._nonzero_where_pruned()
        self.apply_masks()
        in_copies = sum(self.mask_copy(copy) for copy in self.copies)
        bad = {n: c for n, c in found.items() if c}
        if bad:
            _warn(
                f"sparsetrain: at {where}, {sum(bad.values()):,} pruned weights were non-zero in "
                f"{', '.join(f'{n} ({c:,})' for n, c in list(bad.items())[:6])}: something other than the optimizer "
                f"step wrote the weights{' (components on this loop: ' + ', '.join(writers) + ')' if writers else ''}. "
                "The masks are applied again; a component that writes weights between steps should do so before "
                "the optimizer step, or mask what it writes (see docs/rules.md)"
            )
        return sum(bad.values()) + in_copies

    # ------------------------------------------------------------------- end
    def finish(self) -> None:
        """The end of training: below the method's final sparsity, prune to it (``finalize="prune"``) or warn; and
        warn when a layer keeps fewer weights than units to connect (:mod:`sparsetrain.core.starved`)."""
        self.end_forwards()
        if self.masks is not None and self.targets:  # counted from the weights: global thresholds (GMP, GraNet) too
            kept = {n: layer.numel - layer.zeros for n, layer in self.report().layers.items()}
            starved = starved_layers(kept, self.shapes)
            if starved:
                _warn(starved_message(starved, "sparsetrain: at the end of training"))
        report = self._short_of_target()
        if report is not None and self.finalize == "prune":
            new = self.method.final_masks(self.context())
            if new is not None:
                self._final = True
                self.set_masks(new, reset_state=True)
                self._queue_metrics(self.step)
                report = self._short_of_target()
                self.inform(f"sparsetrain (finalize='prune'): pruned to {self.report().global_sparsity:.2%}")
        if report is not None:
            steps = self.method._steps
            _warn(
                f"sparsetrain: training ended after step {self.step} of {self.total_steps or 'an unknown number of'} "
                f"optimizer steps at {report.global_sparsity:.2%} sparsity, below the {self.method.sparsity:.2%} that "
                f"{type(self.method).__name__} aims at (its schedule ends at step {'?' if steps is None else steps.end}). "
                "Train longer or resume, or pass finalize='prune' to prune to the target at the end of fit."
            )

    def _short_of_target(self) -> SparsityReport | None:
        """The targets' report when they hold fewer zeros than the method's final sparsity, else ``None``."""
        if self.masks is None or not self.targets:
            return None
        report = self.report()
        return report if report.numel - report.zeros > self.method.final_kept(self.shapes, self.layouts) else None

    def detach(self) -> None:
        """The end of a run driven by hooks (:func:`sparsetrain.attach`): :meth:`finish`, the invariant, and the
        hooks removed. The model keeps its sparse weights; the engine keeps its masks and :meth:`report`."""
        if self.targets:
            self.finish()
            self.enforce("the end of training")
        self.detach_hooks()

    def detach_hooks(self) -> None:
        """Remove the hooks a loop registered (the sparse kernels' too), and let go of the optimizers."""
        self.end_forwards()
        self.stop_sparse_compute()
        for handle in self.handles:
            handle.remove()
        self.handles, self.optimizers = [], []

    def untrained_prunable(self, model: nn.Module) -> list[str]:
        """Default-prunable weights that an optimizer trains now but that are not targets (frozen or in no
        optimizer when the run started, unfrozen since: e.g. ``BackboneFinetuning``)."""
        trained, targets = self._in_optimizers(), {id(p) for p in self.targets.values()}
        return [n for n, p in self.selection.select(model).items() if id(p) in trained and p.requires_grad and id(p) not in targets]

    # --------------------------------------------------------------- reports
    def report(self) -> SparsityReport:
        """Zeros counted in every target weight now (a collective under FSDP2: call it on every rank)."""
        return sparsity_report(self.targets, self.shards)

    def at_final_sparsity(self) -> bool:
        """Hard masks and at least the method's final number of zeros (what a deployable checkpoint holds)."""
        if self.masks is None:
            return self.method.sparsity == 0
        return not self.stochastic() and self._short_of_target() is None

    def _queue_metrics(self, step: int) -> None:
        metrics = self.report().metrics(per_layer=self.log_per_layer)
        metrics["sparsity/target"] = self.method.target_sparsity(step)
        metrics.update({k: v for k, v in self._change_metrics.items() if self.log_per_layer or k.endswith("/global")})
        metrics.update(self.method.last_metrics)
        if self.on_metrics is not None:
            self.on_metrics(step, metrics)
        else:
            self.metrics.append((step, metrics))

    def pop_metrics(self) -> list[tuple[int, dict[str, float]]]:
        """The queued ``(step, metrics)``, oldest first; the queue is emptied."""
        metrics, self.metrics = self.metrics, []
        return metrics

    # ------------------------------------------------------------------- DDP
    def _check_ranks_agree(self) -> None:
        """A 63-bit hash per mask, compared with one MAX all-reduce of ``[h, -h]``: O(layers) bytes, any world size.

        Sharded masks differ across ranks by design: then what every rank must share is compared instead, the
        step, the seed and the generator's state (every random decision). (Counts need no check: every rank
        gets them from the same all-reduce.)
        """
        if distributed.world_size() <= 1 or self.masks is None:
            return
        if self.shards is not None:
            state = zlib.crc32(bytes(self.generator.get_state().numpy()))
            if compare_across_ranks(torch.tensor([self.step, self.run_seed or 0, state], dtype=torch.int64)):
                raise RuntimeError(
                    f"sparsetrain: the ranks disagree at step {self.step} about the step, seed or generator state "
                    "of the sharded masks; every rank must run the same updates"
                )
            return
        bad = compare_across_ranks(mask_hashes(list(self.masks.values())))
        if bad:
            names = [n for i, n in enumerate(self.masks) if i in bad]
            raise RuntimeError(
                f"sparsity masks differ across DDP ranks at step {self.step} in {names}; every rank must see "
                "identical weights and all-reduced gradients (is a target outside DDP's gradient sync?)"
            )

    # ------------------------------------------------------------ checkpoint
    def config(self) -> dict:
        """What a resume must share with the run that wrote the state (plain values only)."""
        selection = {f"SparsityCallback.{k}": v for k, v in vars(self.selection).items()}
        method = {f"{type(self.method).__name__}.{k}": v for k, v in self.method.hparams().items()}
        return checkpoint.plain_config({**method, **selection})

    def state_dict(self, gather: bool = True) -> dict:
        """The whole run (format: :mod:`sparsetrain.checkpoint`), for ``torch.save`` (a collective under FSDP2:
        every rank calls it). Masks of sharded targets are gathered, bit-packed (``packed_masks``); with
        ``gather=False`` they are left out for the loop to save apart (the Lightning callback's distributed
        checkpoints hold each rank's piece)."""
        sharded = self.shards is not None and self.masks is not None
        state = {
            "format": checkpoint.FORMAT,
            "targets": list(self.targets),
            "masks": None if sharded else checkpoint.masks_for_state(self.masks),
            "sharded": sharded,
            "method": self.method.state_dict(),
            "method_name": type(self.method).__name__,
            "config": self.config(),
            "generator": self.generator.get_state(),
            "seed": self.run_seed,
            "step": self.step,
            "final": self.at_final_sparsity(),
            "soft": self.stochastic(),
            "sparsity": self.report().global_sparsity if self.targets else 0.0,
        }
        if sharded and gather:
            state["packed_masks"] = checkpoint.gather_packed(self.targets, self.masks)
        return state

    def load_state_dict(self, state: dict, path=None, key: str = "") -> None:
        """Load a state; :meth:`begin` applies it once the targets are known. ``path`` and ``key``: the checkpoint
        it came from and the state's key there (where the sharded pieces of a distributed checkpoint folder lie)."""
        self._loaded, self._loaded_path, self._loaded_key = state, path, key

    def load_for_evaluation(self, model: nn.Module) -> None:
        """Apply a loaded state to ``model`` without a training start (``trainer.test(ckpt_path=...)``): its
        targets and masks, for the evaluation forwards."""
        state, self._loaded = self._loaded, None
        if state is None or not checkpoint.started(state):
            return
        params = {clean_name(n): p for n, p in model.named_parameters()}
        missing = [n for n in state["targets"] if n not in params]
        if missing:
            raise SparsityConfigError(f"the checkpoint has masks for {missing[:4]}, which this model does not have")
        self.targets = {n: params[n] for n in state["targets"]}
        self.layouts = target_layouts(model, self.targets)
        self.shards = check_sharding(self.targets, self.method)
        self._load(state, self._loaded_path)
        if state.get("final") is False:
            _warn(
                f"sparsetrain: this checkpoint was saved at step {state['step']} at {state['sparsity']:.2%} sparsity, "
                f"before {type(self.method).__name__} reached its final sparsity with hard masks: it is a model from the "
                "middle of the schedule. Evaluate a checkpoint saved after the schedule's end (save_last=True, or "
                "sparsetrain.SparsityModelCheckpoint, which picks a best checkpoint only from there)"
            )

    def _load(self, state: dict, path) -> None:
        if state.get("format", 1) > checkpoint.FORMAT:
            raise SparsityConfigError(
                f"the checkpoint's sparsity state has format={state['format']}, written by a newer sparsetrain; this one "
                f"reads formats 1 to {checkpoint.FORMAT}: upgrade sparsetrain"
            )
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
        name = type(self.method).__name__
        changed = checkpoint.config_changes(state.get("config") or {}, self.config(), name, self.method.defaults())
        if changed and self.on_config_change == "error":
            raise SparsityConfigError(
                f"the checkpoint was written with another sparsity configuration ({'; '.join(changed)}). Resume with the "
                "configuration of the checkpoint, or pass on_config_change='continue' (to SparsityCallback, attach or "
                "SparsityTrainerCallback) to train on "
                "from its masks with the new one"
            )
        if changed:
            _warn(f"sparsetrain (on_config_change='continue'): resuming with a changed configuration ({'; '.join(changed)})")
        self.masks = self._on_devices(checkpoint.read_masks(state, self.targets, self.shards, path, self._loaded_key))
        self.method.load_state_dict(state["method"])
        self.generator.set_state(state["generator"])
        self.run_seed, self.step = state["seed"], state["step"]
        if changed:
            self._warn_if_sparser_than_configured()

    def _check_weights_belong_to(self, path) -> None:
        """The weights of a resumed model are 0 wherever the loaded hard masks prune: weights from another run or
        from no checkpoint at all would lose their values to those masks without a word."""
        if self.masks is None or self.stochastic():
            return
        found = self._nonzero_where_pruned()
        wrong = {n: c for n, c in found.items() if c}
        if wrong:
            raise SparsityConfigError(
                f"resume: the loaded sparsity state{f' ({path})' if path else ''} prunes weights that are non-zero in the "
                f"model ({', '.join(f'{n}: {c:,}' for n, c in list(wrong.items())[:4])}): the model's weights were not "
                "saved with it. Load the model (and optimizer) from the same checkpoint as the sparsity state; with the "
                "Hugging Face Trainer, a checkpoint folder outside output_dir is given as "
                "TrainingArguments(resume_from_checkpoint=...)"
            )

    def _warn_if_sparser_than_configured(self) -> None:
        """``on_config_change="continue"`` to a lower sparsity: no method revives pruned weights; say so now."""
        if self.masks is None:
            return
        kept = sum(total_counts(self.masks, self.shards).values())
        aims = self.method.final_kept(self.shapes, self.layouts)
        if kept < aims:
            total = sum(math.prod(s) for s in self.shapes.values())
            _warn(
                f"sparsetrain (on_config_change='continue'): the checkpoint's masks keep {kept:,} weights "
                f"({1 - kept / total:.2%} sparse), fewer than the {aims:,} that {self.method!r} ends with. No method "
                "revives pruned weights, so the model stays that sparse. To train it at the lower sparsity, start a new "
                "run from its weights instead of resuming (load the state_dict, no ckpt_path): the new masks keep the "
                "non-zero weights and add zero-valued ones up to the new budget (docs/rules.md)"
            )

    # A torch.Generator pickles its state as a temporary tensor, which torch.multiprocessing
    # (ddp_spawn) shares by file descriptor and frees before the child reads it; send bytes.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["generator"] = bytes(self.generator.get_state().numpy())
        state.update(_swap=None, _hooks=[], copies=[], handles=[], on_metrics=None, inform=_info, sparse=None, _model=None)
        return state

    def __setstate__(self, state: dict) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)


def _identity(t: Tensor | None) -> tuple[int, int] | None:
    """A tensor and its in-place version: another value once a backward accumulates into it or zero_grad runs."""
    return None if t is None else (id(t), t._version)


def _mask_change(old: Masks, new: Masks, kept: list[Tensor], shards: Shards | None) -> dict[str, float]:
    """Fraction of the new active weights that were not active before, per layer and global."""
    both = total_counts({**{("new", n): m for n, m in new.items()}, **{("kept", n): k for n, k in zip(new, kept)}}, shards)
    active = {n: both["new", n] for n in new}
    grown = {n: active[n] - both["kept", n] for n in new}
    metrics = {f"sparsity/mask_change/{n}": grown[n] / max(active[n], 1) for n in new}
    metrics["sparsity/mask_change/global"] = sum(grown.values()) / max(sum(active.values()), 1)
    return metrics
