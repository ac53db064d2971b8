"""Timing for ``compute="auto"``: masked dense against the sparse kernels, for one layer as it really runs.

A candidate's time is one forward plus backward of the layer alone, with the layer's own mask, on
random tensors of its real shapes, dtypes and memory format (weight, input, output gradient), on its
device and at the current thread count. ``masked`` is the dense product (``F.linear``, ``F.conv2d``;
under autocast where the training forward is) plus the gradient mask multiply that the masked path
does for the layer; the sparse candidates are the kernels of :mod:`.linear` (their weight gradient
already has its zeros). Every candidate runs once untimed, then once timed
(the screening round); a candidate whose screening time is more than ``GIVE_UP`` times the fastest
and more than ``GIVE_UP_MS`` is not timed further (that time stands); the others take turns for ``REPEATS`` more rounds, and more
(up to ``MAX_ROUNDS``) until each has run ``MIN_TIMED_MS`` in all (sub-millisecond layers are at the
mercy of a busy machine otherwise), the order rotating from round to round; their time is the median. Random tensors come from a private generator: the run's random stream is untouched.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from sparsetrain.core.kernels import MaskKernel

REPEATS = 3  # rounds at least ...
MIN_TIMED_MS = 50.0  # ... and more, up to MAX_ROUNDS, until each candidate has run this long (small layers are noisy)
MAX_ROUNDS = 25
GIVE_UP = 3.0  # a candidate this many times slower than the fastest in the screening round ...
GIVE_UP_MS = 20.0  # ... and slower than this is not timed further (bounds the cost of timing large layers)
MARGIN = 0.1  # a sparse kernel runs a layer only if it timed at least this much faster than masked (see choose)
_MASK_KERNEL = MaskKernel("eager")


def density_bucket(density: float) -> int:
    """Quarter-octave bucket of a density (1, 0.84, 0.71, 0.59, 0.5, ..., 0.05, 0.042, ...): layers of the
    same shape whose densities share a bucket share one timing."""
    return round(4 * math.log2(max(density, 1e-9)))


def choose(timings: dict[str, float]) -> str:
    """The candidate that runs the layer: the fastest sparse kernel if it timed at least ``MARGIN`` (10 %) faster
    than ``masked``, else ``masked``. Masked is the path the rest of the step was measured with; a near tie in a
    timing of a few milliseconds is noise, and on a shared 2-thread machine near ties picked sparse for layers
    that then made the whole step 6-19 % slower than masked (experiments/bench_sparse_compute.py, 80-90 %)."""
    sparse = {k: v for k, v in timings.items() if k != "masked"}
    if not sparse:
        return "masked"
    best = min(sparse, key=sparse.get)
    return best if sparse[best] < (1 - MARGIN) * timings["masked"] else "masked"


def time_layer(
    products: dict[str, Callable],
    mask: Tensor,
    x_like: Tensor,
    weight_dtype: torch.dtype,
    bias_features: int | None,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Milliseconds of a forward plus backward per candidate.

    ``products[name](x, weight, bias)`` computes the layer's output; ``"masked"`` is the dense product
    (run under autocast when ``autocast_dtype`` is given, and followed by the gradient mask multiply),
    the others the sparse kernels (their weight gradient has its zeros already). ``x_like`` gives the
    input's shape, dtype, memory format and whether it needs a gradient; ``mask`` the weight's shape.
    """
    device = mask.device
    gen = torch.Generator(device).manual_seed(0)
    weight = (torch.randn(mask.shape, generator=gen, device=device) * mask).to(weight_dtype).requires_grad_()
    bias = None
    if bias_features is not None:
        bias = torch.randn(bias_features, generator=gen, device=device).to(weight_dtype).requires_grad_()
    x = torch.empty_like(x_like).normal_(generator=gen).requires_grad_(x_like.requires_grad)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    w_index = next(i for i, t in enumerate(inputs) if t is weight)
    mask_bytes = [mask.view(torch.uint8)]
    dense = products["masked"]

    def dense_product():
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            return dense(x, weight, bias)

    with torch.no_grad():
        dy = torch.empty_like(dense_product()).normal_(generator=gen)

    def masked():
        grads = torch.autograd.grad(dense_product(), inputs, dy)
        _MASK_KERNEL([grads[w_index]], mask_bytes)

    runs = {"masked": masked}
    for name, product in products.items():
        if name != "masked":
            runs[name] = lambda product=product: torch.autograd.grad(product(x, weight, bias), inputs, dy)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    with torch.enable_grad():
        for fn in runs.values():  # first calls pay one-off costs (allocations, kernel selection)
            fn()
        warm = {name: timed(fn) for name, fn in runs.items()}
        fastest = min(warm.values())
        active = [n for n in runs if warm[n] <= max(GIVE_UP * fastest, GIVE_UP_MS)]
        times: dict[str, list[float]] = {n: [] for n in active}
        r = 0
        while r < REPEATS or (r < MAX_ROUNDS and min(sum(t) for t in times.values()) < MIN_TIMED_MS):
            for name in active[r % len(active) :] + active[: r % len(active)]:
                times[name].append(timed(runs[name]))
            r += 1
    return {n: (statistics.median(times[n]) if n in times else warm[n]) for n in runs}
