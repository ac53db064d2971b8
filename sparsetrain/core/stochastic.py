"""Stochastic masks at forward time (the one place the library masks in the forward pass).

Used by stochastic subnetwork annealing (:class:`sparsetrain.methods.StochasticAnnealing`):
on a training forward pass a weight outside the target mask is included with probability
``p_i`` and the network computes with

.. math:: \\tilde w_i = w_i \\cdot [\\,t_i \\lor (u_i < b_i \\cdot s)\\,], \\qquad u_i \\sim U[0, 1)

where ``t`` is the target mask, ``b`` the base probabilities (one 0-dim value per target, or
one value per weight) and ``s`` the annealing scale at this step, so ``p_i = b_i s``. As a
function of the parameter this is ``w * keep``: autograd gives the parameter
the gradient ``g * keep`` (DropConnect: only the sampled and the target weights learn), and
the masked weight exists only between the forward that makes it and the backward that
consumes it.

Randomness. ``u = k / 2^24`` with ``k`` uniform on ``{0, ..., 2^24 - 1}`` (the grid of a
float32 :func:`torch.rand`), drawn as int32 with ``Tensor.random_(0, 2**24)`` (twice as fast
as ``torch.rand`` on CPU) and compared as ``k < p * 2^24`` (exact: scaling by a power of two
loses nothing), from a ``torch.Generator`` re-seeded for every (target, training batch) from
:func:`derive_seed` ``(seed, step, batch, index)``: the same seed gives the same masks on every
DDP rank and after a resume, and the global RNG (data order, dropout) is never touched.

Eager and compiled. ``eager`` runs ``w * (t | (u < b * s))`` per target;
``compiled`` is the same loop over all targets traced once by ``torch.compile`` (one fused
kernel per target for forward and backward; Triton on CUDA, inductor's C++ backend on CPU).
The random numbers are drawn *outside* the compiled function on purpose: ``torch.compile``
cannot take a ``torch.Generator``, and inductor's own RNG produces other numbers than eager
unless ``torch._inductor.config.fallback_random`` is set, a global switch that would also
change the user's compiled model and draw from the global RNG. With the draw outside, the
compiled part is deterministic elementwise float32 arithmetic and gives bit-identical
samples and gradients (``tests/test_annealing.py`` checks it). ``auto`` compiles on CUDA and
stays eager on CPU, where inductor's kernel measured several times slower than eager
(``experiments/results/bench_annealing.md``); a failed compilation warns once and falls back
to eager for good, like :class:`sparsetrain.core.kernels.MaskKernel`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.kernels import CompiledKernel

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (splitmix64 chained over the values).

    Different tuples give unrelated seeds, e.g. ``derive_seed(seed, step, batch, target)``.
    """
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def annealing_scale(step: int, start: int, end: int, schedule: str = "linear", rate: float = 5.0) -> float:
    """Factor ``f(t)`` of the initial inclusion probabilities: 1 up to ``start``, 0 from ``end`` on.

    With ``x = (t - start) / (end - start)``:

    * ``linear``: ``f = 1 - x``;
    * ``cosine``: ``f = (1 + cos(pi x)) / 2``;
    * ``exponential``: ``f = (exp(-rate x) - exp(-rate)) / (1 - exp(-rate))``, an exponential
      decay with rate ``rate`` shifted and rescaled so that it starts at 1 and ends at exactly
      0 (``rate -> 0`` gives ``linear``; the default 5 leaves ``f(1/2) = 1 / (1 + e^{2.5})
      = 0.076``).

    ``t >= end`` returns exactly ``0.0`` (also for ``start == end``).
    """
    if step >= end:
        return 0.0
    if step <= start:
        return 1.0
    x = (step - start) / (end - start)
    if schedule == "linear":
        return 1.0 - x
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if schedule == "exponential":
        return (math.exp(-rate * x) - math.exp(-rate)) / -math.expm1(-rate)
    raise SparsityConfigError(f"schedule={schedule!r} is unknown; allowed: linear, cosine, exponential")


_TWO_24 = float(2**24)


def _sample(
    weights: list[Tensor], targets: list[Tensor], draws: list[Tensor], bases: list[Tensor], scale24: Tensor
) -> list[Tensor]:
    """``w * (t | (k < b * scale * 2^24))``; ``scale24 = scale * 2^24`` (float32, 0-dim)."""
    # bool masks viewed as uint8: the same bytes, and a float-by-uint8 multiply is several times
    # faster on CPU than float-by-bool or torch.where; autograd saves the 1-byte mask for the backward
    return [w * (t | (k < b * scale24)).view(torch.uint8) for w, t, k, b in zip(weights, targets, draws, bases)]


def _draw(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=torch.int32, device=device).random_(0, 2**24, generator=generator)


def sample_masked_weight(
    weight: Tensor, target: Tensor, probability: float | Tensor, generator_or_seed: torch.Generator | int
) -> Tensor:
    """``weight * (target | (rand < probability))`` for one tensor, eager.

    ``rand`` comes from ``generator_or_seed`` (a generator on the weight's device, advanced by
    the draw, or an int seed for a fresh one). ``probability`` is a number or a tensor
    broadcastable to ``weight``. Differentiable in ``weight``: the gradient is masked the same way.
    """
    generator = generator_or_seed
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator(device=weight.device).manual_seed(int(generator_or_seed))
    k = _draw(weight.shape, generator, weight.device)
    p = torch.as_tensor(probability, dtype=torch.float32, device=weight.device)
    return _sample([weight], [target], [k], [p], torch.tensor(_TWO_24, device=weight.device))[0]


class StochasticKernel(CompiledKernel):
    """Sampled masked weights for a list of targets; ``kind`` is ``auto``, ``eager`` or ``compiled``."""

    eager_fn = traced_fn = staticmethod(_sample)
    name = "stochastic mask kernel"

    def __init__(self, kind: str = "auto"):
        super().__init__(kind)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def draws(self, weights: Sequence[Tensor], seed: int) -> list[Tensor]:
        """int32 tensors ``k`` uniform on ``[0, 2^24)`` shaped like ``weights`` (``u = k / 2^24``);
        target ``i`` from ``derive_seed(seed, i)``."""
        out = []
        for i, w in enumerate(weights):
            g = self._generator(w.device)
            g.manual_seed(derive_seed(seed, i))
            out.append(_draw(w.shape, g, w.device))
        return out

    def sample(
        self, weights: Sequence[Tensor], targets: Sequence[Tensor], bases: Sequence[Tensor], scale: float, seed: int
    ) -> list[Tensor]:
        """``w * (t | (u < b * scale))`` per target, ``u = k / 2^24`` with ``k = draws(weights, seed)``.

        ``bases`` are float32 tensors on the weights' devices, 0-dim or shaped like the weight.
        The results stay connected to ``weights`` in the autograd graph.
        """
        weights, targets, bases = list(weights), list(targets), list(bases)
        if not weights:
            return []
        draws = self.draws(weights, seed)
        device = weights[0].device
        scale24 = torch.tensor(float(scale) * _TWO_24, dtype=torch.float32).to(device, non_blocking=True)
        return self.run(device, weights, targets, draws, bases, scale24)

    @staticmethod
    @torch.no_grad()
    def deterministic(weights: Iterable[Tensor], targets: Iterable[Tensor]) -> list[Tensor]:
        """``w * target`` per target, without gradient (the network that evaluation sees)."""
        return [w.detach() * t.view(torch.uint8) for w, t in zip(weights, targets)]

    def __getstate__(self) -> dict:  # generators do not pickle either; rebuild lazily
        return {**super().__getstate__(), "_generators": {}}


class ParameterSwap:
    """Put tensors in the place of parameters inside their modules, and put the parameters back.

    ``ParameterSwap(model, {name: parameter})`` finds every module that owns each parameter
    (all owners of a shared parameter). :meth:`swap_in` writes a tensor per parameter into the
    owners' ``_parameters`` (so ``module.weight`` and every functional use see it, also a
    parent that reads a child's weight directly, as ``nn.MultiheadAttention`` does with
    ``out_proj``); :meth:`restore` puts the ``nn.Parameter`` objects back. Nothing is renamed and
    no hook is registered, so outside a swap the model is untouched: same state-dict keys,
    ``deepcopy`` and pickling as without it.
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor]):
        wanted = {id(p): i for i, p in enumerate(params.values())}
        self.model = model
        self.params = list(params.values())
        self.owners: list[tuple[nn.Module, str, int]] = []
        seen = set()
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in wanted and (id(module), attr) not in seen:
                    seen.add((id(module), attr))
                    self.owners.append((module, attr, wanted[id(p)]))
        missing = set(range(len(self.params))) - {i for _, _, i in self.owners}
        if missing:
            names = [n for i, n in enumerate(params) if i in missing]
            raise RuntimeError(f"parameters {names} were not found in any module of {type(model).__name__}")
        self.active = False

    def swap_in(self, tensors: Sequence[Tensor]) -> None:
        for module, attr, i in self.owners:
            module._parameters[attr] = tensors[i]
        self.active = True

    def restore(self) -> None:
        if self.active:
            for module, attr, i in self.owners:
                module._parameters[attr] = self.params[i]
            self.active = False


class _StraightThroughMask(torch.autograd.Function):
    """``w * mask`` forward; the gradient passes to ``w`` unmasked (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask.view(torch.uint8)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def straight_through_masked(weights: Iterable[Tensor], masks: Iterable[Tensor]) -> list[Tensor]:
    """``w * mask`` per target, whose gradient reaches the dense ``w`` unmasked (SR-STE's forward).

    The masked weight is exact (``w`` or ``0``); autograd gives ``w`` the gradient of the masked
    weight at every position, pruned ones included, so a pruned weight keeps learning and can
    win its place back when the mask is recomputed from ``|w|``.
    """
    return [_StraightThroughMask.apply(w, m) for w, m in zip(weights, masks)]
