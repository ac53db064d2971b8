"""Instruments for the benchmarks: a plain classifier, step timers, and timers of the work a method adds.

Shared by ``bench_overhead.py`` and ``bench_annealing.py``. Steps are timed from the first
callback's ``on_train_batch_start`` to the end of ``on_train_batch_end`` (CUDA synchronised);
sparsetrain's per-step hooks are timed directly (``HookTimer``); ``ProfiledWork`` uses
torch.profiler to time what sparsetrain and torch.nn.utils.prune add inside a step.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn
from torch.nn.utils import prune
from torch.profiler import ProfilerActivity, profile, record_function

from sparsetrain import SparsityCallback


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _sync(trainer: L.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()


class StepStart(L.Callback):
    """First in the callback list: notes when a training step starts."""

    def __init__(self):
        self.t0 = 0.0

    def on_train_batch_start(self, trainer, *args):
        _sync(trainer)
        self.t0 = time.perf_counter()


class StepEnd(L.Callback):
    """After the sparsity callbacks: records the whole step, mask work included, then (optionally) memory."""

    def __init__(self, start: StepStart, measure_memory=None):
        self.start, self.times, self.measure_memory, self.extra_bytes = start, [], measure_memory, 0.0

    def on_train_batch_end(self, trainer, *args):
        _sync(trainer)
        self.times.append(time.perf_counter() - self.start.t0)
        if self.measure_memory is not None:
            self.extra_bytes = self.measure_memory()  # outside the timed window


class HookTimer:
    """Wraps a SparsityCallback's per-step hooks and sums their time per step (the mask work itself)."""

    def __init__(self, cb: SparsityCallback, cuda: bool):
        self.cuda, self.events, self.per_step_s, self._acc = cuda, [], [], []
        for hook in ("on_before_optimizer_step", "on_train_batch_end"):
            setattr(cb, hook, self._timed(getattr(cb, hook), close_step=hook == "on_train_batch_end"))

    def _timed(self, fn, close_step: bool):
        def wrapper(*args, **kwargs):
            if self.cuda:  # CUDA events: no synchronisation inside the step
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args, **kwargs)
                end.record()
                self._acc.append((start, end))
            else:
                t0 = time.perf_counter()
                fn(*args, **kwargs)
                self._acc.append(time.perf_counter() - t0)
            if close_step:
                self.events.append(self._acc)
                self._acc = []

        return wrapper

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [sum(s.elapsed_time(e) / 1000 for s, e in step) for step in self.events]
        return [sum(step) for step in self.events]


MUL_BACKWARD = "autograd::engine::evaluate_function: MulBackward0"


def _labelled(fn, label: str):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


class ProfiledWork(L.Callback):
    """Profiles the second epoch and sums, per step, the time of the work each method adds.

    sparsetrain: its per-step hooks (labelled ``sparsetrain``). torch.nn.utils.prune and
    ModelPruning: the forward pre-hooks that compute ``weight = weight_orig * weight_mask``
    (labelled ``prune_forward``) and the backward of that multiply (``MulBackward0``; the same
    count for the dense model, zero for ResNets, is subtracted by the caller). Goes first in the
    callback list, so that it unwraps the pruning hooks before ModelPruning prunes again.
    """

    def __init__(self, sparsity: list[L.Callback], cuda: bool):
        self.cuda, self.prof, self.wrapped, self.steps = cuda, None, [], 0
        for cb in sparsity:
            if isinstance(cb, SparsityCallback):
                for hook in ("on_before_optimizer_step", "on_train_batch_end"):
                    setattr(cb, hook, _labelled(getattr(cb, hook), "sparsetrain"))

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        for module in pl_module.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, prune.BasePruningMethod):
                    self.wrapped.append((module, key, hook))
                    module._forward_pre_hooks[key] = _labelled(hook, "prune_forward")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def on_train_batch_end(self, trainer, *args):
        self.steps += trainer.current_epoch == 1

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        _sync(trainer)
        self.prof.__exit__(None, None, None)
        for module, key, hook in self.wrapped:
            module._forward_pre_hooks[key] = hook

    def per_step_ms(self) -> dict[str, float]:
        totals = {"sparsetrain": 0.0, "prune_forward": 0.0, MUL_BACKWARD: 0.0}
        for event in self.prof.events():
            if event.name in totals:
                totals[event.name] += event.device_time_total if self.cuda else event.cpu_time_total
        return {name: us / 1000 / self.steps for name, us in totals.items()}


# ----------------------------------------------------------------------------- plain-torch steps
def paired_rounds(steps: dict, rounds: int, per_round: int, cuda: bool = False) -> dict[str, list[float]]:
    """Times plain step functions in one process: every round runs each ``steps[name]()`` ``per_round`` times,
    the order of the names rotating from round to round; returns, per name, its median step (seconds)
    of each round, so that ratios can be taken per round (paired) and the slow drift of a shared machine
    cancels."""
    names = list(steps)
    per_name: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times = []
            for _ in range(per_round):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                steps[name]()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            per_name[name].append(sorted(times)[len(times) // 2])
    return per_name


class LiveBytes:
    """Peak bytes of tensor storage allocated while it is active (a ``TorchDispatchMode`` sees every op's outputs).

    ``with LiveBytes(existing) as m: step()`` then ``m.peak``: the highest sum of live storage bytes created
    inside the block. Storages of ``existing`` tensors (parameters, optimizer state, masks, inputs: what lives
    before the step) are not counted when ops return them (in-place ops). Sparse CSR outputs count their
    index and value tensors. For CPU memory, where torch keeps no allocator statistics.
    """

    def __init__(self, existing=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        outer._track(t)
                return out

        self._mode = _Mode()
        self.seen = {t.untyped_storage().data_ptr() for t in existing if t is not None and t.layout == torch.strided}
        self.live = self.peak = 0

    def _track(self, t) -> None:
        import weakref

        if t.layout == torch.sparse_csr:
            for part in (t.crow_indices(), t.col_indices(), t.values()):
                self._track(part)
            return
        if t.layout != torch.strided or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self.seen or nbytes == 0:
            return
        self.seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key, nbytes) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.layout == torch.strided:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
