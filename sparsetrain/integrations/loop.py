"""Sparse training in any PyTorch loop, without changing the loop: :func:`attach`.

.. code-block:: python

    engine = sparsetrain.attach(model, optimizer, "rigl", sparsity=0.9, total_steps=1000)
    for x, y in loader:                     # the loop you already have
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()                    # the engine works in the optimizer's step hooks
        optimizer.zero_grad()
    engine.detach()                         # end of training: final check, hooks removed

The engine registers ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook`` on every optimizer:
before a step it copies the gradients an update needs and zeroes those of masked weights; after it, it counts
the step (every optimizer's step counts, as ``trainer.global_step`` does) and runs the updates due. Methods with
soft masks (``StochasticAnnealing``, ``SRSTE``) also get a forward pre-hook and hook on the model: training
forwards see sampled or straight-through weights (forward ``f`` after step ``t`` draws from the seed of
``(t, f)``) until their backward has reached every target (the parameters are back in their modules for
whatever runs between backward and step), evaluation forwards (``model.eval()``) the target network ``w * mask``.

* ``torch.amp.GradScaler``: ``scaler.step(optimizer)`` unscales before the step, so the hooks see the real
  gradients; a step it skips (inf/NaN) is not an optimizer step and is not counted. A fused optimizer
  (``fused=True``) unscales inside its step: the hooks then read the scale and the inf flag GradScaler gives it.
* Gradient clipping before ``optimizer.step()`` sees the pruned weights' gradients too; call
  ``engine.mask_gradients()`` before clipping to clip what the optimizer will use (the Lightning callback does).
* Resume: ``torch.save(engine.state_dict(), path)`` next to the model's and optimizer's state, and
  ``attach(..., state=torch.load(path))`` after loading those: the run continues exactly.
* Lightning Fabric: pass what ``fabric.setup`` returned (the wrappers are looked through); under DDP every rank
  gets identical masks (decisions on all-reduced gradients, a seed broadcast from rank 0, a hash check).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from sparsetrain.engine import SparsityEngine
from sparsetrain.methods.base import SparsityMethod

log = logging.getLogger("sparsetrain")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's ``_FabricModule``, ``DistributedDataParallel`` and ``torch.compile``."""
    model = getattr(model, "_original_module", model)  # lightning.fabric.wrappers._FabricModule
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch._dynamo.OptimizedModule


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside Lightning's and Fabric's (``_optimizer``) and Accelerate's
    (``optimizer``) wrappers: its step hooks run whichever wrapper steps it."""
    while True:
        inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner


def _log_updates(step: int, metrics: dict[str, float]) -> None:
    log.info("step %d: sparsity %.4f (target %.4f)", step, metrics["sparsity/global"], metrics["sparsity/target"])


class StepHooks:
    """The hooks through which a plain loop drives ``engine`` (registered by :func:`drive`)."""

    def __init__(self, engine: SparsityEngine, model: nn.Module, counts_steps: bool):
        self.engine, self.model, self.counts_steps = engine, model, counts_steps
        self.forwards = 0  # training forwards since the last optimizer step
        self.skipped = False  # the step in progress changes nothing (GradScaler found inf with a fused optimizer)

    def before_any_step(self, optimizer, args, kwargs) -> None:
        """A global hook (the optimizers were not given): an optimizer that trains a target joins at its first step."""
        if optimizer not in self.engine.optimizers and self.engine.trained_by(optimizer):
            self.engine.add_optimizer(optimizer)
        if optimizer in self.engine.optimizers:
            self.before_step(optimizer, args, kwargs)

    def after_any_step(self, optimizer, args, kwargs) -> None:
        if optimizer in self.engine.optimizers:
            self.after_step(optimizer, args, kwargs)

    def before_step(self, optimizer, args, kwargs) -> None:
        self.engine.end_forwards()
        self.forwards = 0
        # a fused optimizer under GradScaler unscales inside its step: GradScaler hands it the scale and the inf
        # flag as attributes, and calls the step also when the gradients are not finite (it then changes nothing)
        found_inf, scale = getattr(optimizer, "found_inf", None), getattr(optimizer, "grad_scale", None)
        self.skipped = found_inf is not None and bool(found_inf.item())
        if not self.skipped:
            self.engine.before_optimizer_step(optimizer, grad_scale=1.0 if scale is None else scale)

    def after_step(self, optimizer, args, kwargs) -> None:
        if self.counts_steps and not self.skipped:
            self.engine.advance(self.engine.step + 1)

    def before_forward(self, module: nn.Module, args) -> None:
        self.engine.end_forwards()
        if module.training:
            self.engine.begin_training_forwards(self.model, (self.engine.step, self.forwards))
            self.forwards += 1
        else:
            self.engine.swap_in_evaluation(self.model)

    def after_forward(self, module: nn.Module, args, output) -> None:
        if not module.training:
            self.engine.restore()


def drive(
    engine: SparsityEngine,
    model: nn.Module,
    optimizers,
    total_steps: int | None = None,
    state: dict | None = None,
    step: int = 0,
    log_metrics: Callable[[int, dict[str, float]], None] | None = None,
    counts_steps: bool = True,
) -> SparsityEngine:
    """Start ``engine`` on ``model`` and register the hooks through which ``optimizers`` drive it.

    ``optimizers=None``: not known here (the Hugging Face Trainer does not pass its own to callbacks); global
    optimizer step hooks then take every optimizer that trains a target at its first step.
    ``counts_steps=False``: the loop calls ``engine.advance(step)`` itself (the Hugging Face Trainer counts its
    steps, skipped ones included). ``log_metrics(step, metrics)`` receives the sparsity metrics after every
    update (default: one ``logging`` line in the ``sparsetrain`` logger).
    """
    model = unwrap_model(model)
    found_later = optimizers is None
    optimizers = [] if found_later else [unwrap_optimizer(o) for o in (optimizers if isinstance(optimizers, Iterable) else [optimizers])]
    engine.on_metrics = log_metrics or _log_updates
    engine.setup(model, optimizers, total_steps)
    if state is not None:
        engine.load_state_dict(state)
    engine.begin(step)
    hooks = StepHooks(engine, model, counts_steps)
    for optimizer in optimizers:
        engine.handles += [optimizer.register_step_pre_hook(hooks.before_step), optimizer.register_step_post_hook(hooks.after_step)]
    if found_later:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        engine.handles += [register_optimizer_step_pre_hook(hooks.before_any_step), register_optimizer_step_post_hook(hooks.after_any_step)]
    if "soft_masks" in engine.method.supports:
        engine.handles += [model.register_forward_pre_hook(hooks.before_forward), model.register_forward_hook(hooks.after_forward)]
        # the parameters go back into their modules once one backward has given every target its gradient: what
        # the loop does between backward and step (clip_grad_norm_(model.parameters()), the HF Trainer's clipping)
        # sees them. A backward that gives only some (reentrant activation checkpointing runs a nested backward per
        # segment, and later segments recompute with the swapped weights) leaves them until the step.
        trained = [p for p in engine.targets.values() if p.requires_grad]

        def restore_after_backward(grads) -> None:
            if all(g is not None for g in grads):
                engine.restore()

        if trained:
            engine.handles.append(torch.autograd.graph.register_multi_grad_hook(trained, restore_after_backward, mode="all"))
    return engine


def attach(
    model: nn.Module,
    optimizers,
    method: SparsityMethod | str,
    total_steps: int | None = None,
    *,
    state: dict | None = None,
    log_metrics: Callable[[int, dict[str, float]], None] | None = None,
    **engine_args,
) -> SparsityEngine:
    """Make ``model`` sparse while a plain PyTorch loop trains it with ``optimizers`` (module docstring).

    Args:
        model: the model (or what ``fabric.setup`` returned); its targets are chosen now, so build, wrap and
            shard it first.
        optimizers: one optimizer or a list (Fabric's wrappers are fine).
        method: a method or its registered name, as for :class:`~sparsetrain.SparsityCallback`.
        total_steps: all optimizer steps of the run, every optimizer counted (what fractions of training such
            as RigL's default ``end=0.75`` refer to); ``None`` if unknown (then give int steps).
        state: ``engine.state_dict()`` of the run to resume (load the model and optimizer state first).
        log_metrics: ``(step, metrics) -> None`` after every update, e.g. ``wandb.log`` without the step.
        engine_args: the method's arguments and :class:`~sparsetrain.engine.SparsityEngine`'s (``seed``,
            ``include``, ``exclude``, ``finalize``, ...).

    Returns the running :class:`~sparsetrain.engine.SparsityEngine`; ``engine.detach()`` ends the run.
    """
    return drive(SparsityEngine(method, **engine_args), model, optimizers, total_steps, state=state, log_metrics=log_metrics)
