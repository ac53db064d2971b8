"""Two other places to multiply gradients by their masks than one ``foreach`` pass before the optimizer step.

Measured against that pass in ``experiments/bench_grad_masking.py`` (results and the recommendation in
``docs/sparse_compute.md``):

* :func:`mask_grads_on_accumulate`: each gradient is masked by its own
  ``Tensor.register_post_accumulate_grad_hook`` right after autograd accumulates it into ``.grad``;
* :func:`masked_sgd_step`: the mask is folded into an SGD-momentum foreach update
  (``buf = momentum * buf + mask * grad + weight_decay * w``, ``w -= lr * buf``), with no pass of its own.

Both are plain torch. Caveats an engine must weigh: a post-accumulate hook runs once per backward
(gradient accumulation masks every micro-batch), before anything that rewrites ``.grad`` later in the
step (DDP without ``gradient_as_bucket_view`` copies the all-reduced bucket back into ``.grad`` after
the hooks of the parameter; a user hook could add noise); and hooks on parameters are kept by
``deepcopy`` of the model while they exist (remove them with the returned handles). The fold replaces
the user's optimizer update, so it only exists for an optimizer that sparsetrain re-implements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from sparsetrain.core.kernels import CPU_CHUNK, cpu_chunks


class _MaskOnAccumulate:
    """A post-accumulate-grad hook: ``param.grad *= mask`` (``timer(seconds)`` receives its duration if given)."""

    def __init__(self, mask: Tensor, timer: Callable[[float], None] | None):
        self.mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        self.timer = timer

    def __call__(self, param: Tensor) -> None:
        t0 = time.perf_counter() if self.timer is not None else 0.0
        grads, masks = [param.grad], [self.mask]
        if param.grad.device.type == "cpu":
            grads, masks = cpu_chunks(grads, masks)
        with torch.no_grad():
            torch._foreach_mul_(grads, masks)
        if self.timer is not None:
            self.timer(time.perf_counter() - t0)


def mask_grads_on_accumulate(
    params: Mapping[str, Tensor], masks: Mapping[str, Tensor], timer: Callable[[float], None] | None = None
) -> list[RemovableHandle]:
    """Mask each gradient where it is produced: ``register_post_accumulate_grad_hook`` on every parameter.

    ``params``/``masks``: name -> tensor. Returns the handles (``handle.remove()`` detaches). The masks are
    held by reference: changing one in place changes what its hook multiplies by.
    """
    return [p.register_post_accumulate_grad_hook(_MaskOnAccumulate(masks[n], timer)) for n, p in params.items()]


@torch.no_grad()
def masked_sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    bufs: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> None:
    """SGD with momentum, the gradient masks folded into its foreach update.

    For every parameter with a gradient: ``buf = momentum * buf + mask * grad + weight_decay * w`` then
    ``w = w - lr * buf`` (``mask`` ``None``: no mask). ``bufs`` start at zero, so the first step gives
    ``buf = grad + weight_decay * w``, as ``torch.optim.SGD`` (dampening 0, no Nesterov). With zeros at
    masked positions of ``w`` and ``buf`` they stay zero. Bool masks are read as uint8; on the CPU the
    tensors go in pieces of ``CPU_CHUNK`` elements (see :mod:`sparsetrain.core.kernels`).
    """
    live = [(p, g, b, m) for p, g, b, m in zip(params, grads, bufs, masks) if g is not None]
    if not live:
        return
    ps, gs, bs, ms = (list(t) for t in zip(*live))
    torch._foreach_mul_(bs, momentum)
    plain = [(b, g) for b, g, m in zip(bs, gs, ms) if m is None]
    masked = [(b, g, m.view(torch.uint8) if m.dtype == torch.bool else m) for b, g, m in zip(bs, gs, ms) if m is not None]
    if plain:
        torch._foreach_add_([b for b, _ in plain], [g for _, g in plain])
    if masked:
        mb, mg, mm = (list(t) for t in zip(*masked))
        if mb[0].device.type == "cpu":
            mb, mg, mm = _chunk3(mb, mg, mm)
        torch._foreach_addcmul_(mb, mg, mm)
    if weight_decay:
        torch._foreach_add_(bs, ps, alpha=weight_decay)
    torch._foreach_add_(ps, bs, alpha=-lr)


def _chunk3(a: list[Tensor], b: list[Tensor], c: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The same triples, contiguous tensors above ``CPU_CHUNK`` elements cut into flat pieces."""
    out_a, out_b, out_c = [], [], []
    for x, y, z in zip(a, b, c):
        if x.numel() > CPU_CHUNK and x.is_contiguous() and y.is_contiguous() and z.is_contiguous():
            out_a += x.view(-1).split(CPU_CHUNK)
            out_b += y.view(-1).split(CPU_CHUNK)
            out_c += z.view(-1).split(CPU_CHUNK)
        else:
            out_a.append(x)
            out_b.append(y)
            out_c.append(z)
    return out_a, out_b, out_c
