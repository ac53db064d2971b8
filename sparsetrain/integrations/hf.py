"""Sparse training with the Hugging Face ``Trainer``: :class:`SparsityTrainerCallback`.

.. code-block:: python

    from sparsetrain.integrations.hf import SparsityTrainerCallback

    trainer = Trainer(model, args, train_dataset=data, callbacks=[SparsityTrainerCallback("gmp", sparsity=0.9)])
    trainer.train()                          # or trainer.train(resume_from_checkpoint=True)
    model.save_pretrained("out")             # 90 % of the prunable weights are exact zeros

The callback drives a :class:`~sparsetrain.engine.SparsityEngine` through the optimizer's step hooks (as
:func:`sparsetrain.attach` does; the hooks sit on the ``torch.optim`` optimizer inside Accelerate's wrapper, so
they run after gradient clipping and AMP unscaling), and counts steps as the Trainer does (``state.global_step``,
``max_steps`` for fractions of training). Every checkpoint folder ``checkpoint-<step>`` gets the run's state in
``sparsetrain.pt``; ``trainer.train(resume_from_checkpoint=...)`` reads it back from the folder of the resumed
step, so the run continues exactly (a folder outside ``output_dir``: give it as
``TrainingArguments(resume_from_checkpoint=...)``, since the Trainer does not tell callbacks where it resumes from).
With ``load_best_model_at_end`` the masks of the best checkpoint come back with its weights (and a warning when
that checkpoint predates the final sparsity). The sparsity metrics are added to the Trainer's ``logs`` and
``state.log_history``; the Trainer runs its ``report_to`` callbacks (TensorBoard, W&B, ...) first, so call
:func:`report_first` for them to log the sparsity metrics too.

Clipping (``max_grad_norm``, on by default in ``TrainingArguments``) runs before the hooks, so the clipped norm
includes the pruned weights' gradients; set ``max_grad_norm=0`` or accept that small difference from the
Lightning callback, which masks before clipping.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch
from transformers import TrainerCallback

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.engine import SparsityEngine
from sparsetrain.integrations.loop import drive
from sparsetrain.methods.base import SparsityMethod

STATE_FILE = "sparsetrain.pt"


class SparsityTrainerCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that makes the model sparse while the ``Trainer`` trains it.

    Args:
        method: a :class:`~sparsetrain.methods.base.SparsityMethod` or its registered name.
        engine_args: the method's arguments and :class:`~sparsetrain.engine.SparsityEngine`'s (``seed``,
            ``include``, ``exclude``, ``finalize``, ...), e.g. ``SparsityTrainerCallback("rigl", sparsity=0.9)``.
    """

    def __init__(self, method: SparsityMethod | str, **engine_args):
        self.engine = SparsityEngine(method, **engine_args)
        self._latest: dict[str, float] = {}

    def _keep(self, step: int, metrics: dict[str, float]) -> None:
        self._latest = metrics

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.engine.detach_hooks()  # a previous train() that raised left its hooks
        saved = None
        if state.global_step > 0:  # a resume: the Trainer names its checkpoint folders by step
            folders = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
            if isinstance(args.resume_from_checkpoint, str):
                folders.insert(0, args.resume_from_checkpoint)
            found = [f for f in folders if os.path.isfile(os.path.join(f, STATE_FILE))]
            if not found:
                raise SparsityConfigError(
                    f"resume_from_checkpoint: the Trainer resumes at step {state.global_step}, but no {STATE_FILE} is in "
                    f"{' or '.join(folders)}. The Trainer does not tell callbacks which folder it resumes from: resume "
                    "from a checkpoint in output_dir, or give its folder as TrainingArguments(resume_from_checkpoint=...)"
                )
            saved = torch.load(os.path.join(found[0], STATE_FILE), map_location="cpu", weights_only=False)
            if saved["step"] != state.global_step:
                raise SparsityConfigError(
                    f"{os.path.join(found[0], STATE_FILE)} holds step {saved['step']}, but the Trainer resumes at step "
                    f"{state.global_step}: it belongs to another run"
                )
        total = state.max_steps if state.max_steps and state.max_steps > 0 else None
        # the Trainer's optimizer (transformers 5 passes its own too); None: the engine finds it at its first step
        drive(self.engine, model, optimizer, total, state=saved, step=state.global_step, log_metrics=self._keep, counts_steps=False)

    def on_step_end(self, args, state, control, **kwargs):
        self.engine.advance(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._latest:
            logs.update(self._latest)
            if state.log_history:
                state.log_history[-1].update(self._latest)

    def on_save(self, args, state, control, **kwargs):
        run_state = self.engine.state_dict()
        if state.is_world_process_zero:
            torch.save(run_state, os.path.join(saved_folder(args.output_dir, state.global_step), STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        saved = os.path.join(best, STATE_FILE) if best else None
        if saved and os.path.isfile(saved):  # the Trainer has loaded the best checkpoint's weights: take its masks
            best_state = torch.load(saved, map_location="cpu", weights_only=False)
            self.engine.masks = self.engine._on_devices(best_state["masks"])
            if not best_state.get("final", True):
                warnings.warn(
                    f"sparsetrain: the best checkpoint ({best}, metric_for_best_model={args.metric_for_best_model!r}) was "
                    f"saved at step {best_state['step']} at {best_state['sparsity']:.2%} sparsity, before the method reached "
                    "its final sparsity with hard masks: load_best_model_at_end loaded that model. Set "
                    "load_best_model_at_end=False to keep the final weights",
                    UserWarning,
                    stacklevel=2,
                )
                self.engine.detach_hooks()
                return
        self.engine.detach()


def saved_folder(output_dir: str, step: int) -> str:
    """The folder the Trainer has just saved step ``step`` to: ``output_dir/checkpoint-<step>``, or in a
    hyperparameter search the trial's ``output_dir/<run>/checkpoint-<step>`` (the newest of those)."""
    name = f"checkpoint-{step}"
    found = glob.glob(os.path.join(glob.escape(output_dir), name)) + glob.glob(os.path.join(glob.escape(output_dir), "*", name))
    found = [f for f in found if os.path.isdir(f)]
    if not found:
        os.makedirs(os.path.join(output_dir, name), exist_ok=True)
        return os.path.join(output_dir, name)
    return max(found, key=_written_at)


def _written_at(folder: str) -> float:
    state = os.path.join(folder, "trainer_state.json")  # rewritten at every save (a folder's own time is not)
    return os.path.getmtime(state if os.path.isfile(state) else folder)


def report_first(trainer) -> None:
    """Put the ``SparsityTrainerCallback`` of ``trainer`` before its other callbacks.

    The Trainer runs the reporting callbacks it builds from ``report_to`` (TensorBoard, W&B, MLflow, ...) before
    the callbacks you pass, and they send ``logs`` as they get them; the sparsity metrics this callback adds to
    ``logs`` reach them only when it runs first: ``trainer = Trainer(..., callbacks=[SparsityTrainerCallback(...)])``,
    then ``report_first(trainer)``."""
    handler = trainer.callback_handler
    ours = [c for c in handler.callbacks if isinstance(c, SparsityTrainerCallback)]
    if not ours:
        raise ValueError("report_first: this Trainer has no SparsityTrainerCallback (pass it in callbacks=[...])")
    handler.callbacks = ours + [c for c in handler.callbacks if not isinstance(c, SparsityTrainerCallback)]
