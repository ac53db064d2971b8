"""Cost of one RigL mask update, and its share of training time at ``every=100``.

For torchvision ResNet-50 (25.5 M prunable weights) and ResNet-18 (11.7 M), on the CPU:

* ``update``: ``RigL.update`` (per layer: drop the smallest ``|w|``, grow the largest
  ``|grad|``), at 90 % ERK sparsity and the first update's drop fraction 0.3 (the largest);
* ``engine extras``: what :class:`~sparsetrain.engine.SparsityEngine` adds on an update step, timed
  through its own calls: ``before_optimizer_step`` (the copy of the dense gradients, the masking of
  the gradients) and ``set_masks`` (the reset of SGD momentum where masks changed, the multiply of
  the weights by the new masks);
* ``step``: one dense SGD training step (forward, backward, momentum step) on a random
  32x32 batch of 64 (the models as torchvision builds them: ImageNet stem, 1000 classes);
* ``share = (update + extras) / (every * step)``: the fraction of training time spent in
  mask updates with one update every ``every`` steps. The goal is below 1 %.

Each time is the median of ``--repeats`` runs after one warm-up, wall clock and process CPU
time. One thread by default: on a shared machine that keeps the CPU time meaningful. Usage::

    python experiments/bench_rigl_update.py                 # writes experiments/results/bench_rigl_update.md
    python experiments/bench_rigl_update.py --out /tmp/rigl # writes /tmp/rigl/bench_rigl_update.md

Writes ``<out>/bench_rigl_update.md`` (default experiments/results/).
"""

from __future__ import annotations

import platform
import statistics

import torch
import torchvision

from common import command, command_block, dense_sgd_step, parser, timed
from sparsetrain.engine import SparsityEngine
from sparsetrain.methods import RigL


def setup_update(model: torch.nn.Module, sparsity: float, every: int):
    """A RigL update of ``model``'s targets at its first update step, and the engine's extra work on that step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = SparsityEngine(RigL(sparsity=sparsity, distribution="erk", every=every, end=100 * every), seed=0)
    engine.setup(model, [optimizer], 1000 * every)
    engine.begin(0)
    for p in engine.targets.values():
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    grads = {n: torch.randn_like(p) for n, p in engine.targets.items()}
    ctx, new = engine.context(), {}

    def update():
        new.update(engine.method.update(ctx, every, grads))

    def extras():  # what the engine does on an update step besides calling the method
        for n, p in engine.targets.items():
            p.grad = grads[n].clone()
        engine.before_optimizer_step(optimizer, every)
        engine.set_masks(new)
        engine._grads.clear()

    return engine.method, sum(p.numel() for p in engine.targets.values()), update, extras


def bench(name: str, sparsity: float, every: int, repeats: int) -> dict:
    """Update, extras and step timed in turn, ``repeats`` times after a warm-up, so all see the same load."""
    model = getattr(torchvision.models, name)()  # default 1000-class head: ResNet-50 has 25.5 M weights
    method, weights, update, extras = setup_update(model, sparsity, every)
    step = dense_sgd_step(model)
    update(), extras(), step()
    runs = {"update": [], "extras": [], "step": []}
    for _ in range(repeats):
        for key, fn in (("update", update), ("extras", extras), ("step", step)):
            runs[key].append(timed(fn))
    out = {"weights": weights, "drop_fraction": method.last_metrics["rigl/drop_fraction"]}
    for key, values in runs.items():
        out[f"{key}_wall"] = statistics.median(v[0] for v in values)
        out[f"{key}_cpu"] = statistics.median(v[1] for v in values)
    for clock in ("wall", "cpu"):
        out[f"share_{clock}"] = (out[f"update_{clock}"] + out[f"extras_{clock}"]) / (every * out[f"step_{clock}"])
    return out


def main(argv=None) -> None:
    args = parser(__doc__)
    args.add_argument("--sparsity", type=float, default=0.9)
    args.add_argument("--every", type=int, default=100)
    args.add_argument("--repeats", type=int, default=7)
    args = args.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for name in ("resnet50", "resnet18"):
        rows.append((name, bench(name, args.sparsity, args.every, args.repeats)))
        print(name, rows[-1][1], flush=True)

    lines = [
        "# Cost of a RigL mask update",
        "",
        f"CPU ({platform.machine()}, {args.threads} thread(s), torch {torch.__version__}) on a machine shared with "
        f"other jobs; medians of {args.repeats} runs after a warm-up, update and training step timed in turn so "
        "that both see the same load. Wall-clock and process CPU time are both given: under load the CPU "
        f"time is the steadier of the two. RigL at {100 * args.sparsity:g} % ERK sparsity at its first update "
        f"(drop fraction {rows[0][1]['drop_fraction']}, the largest), random dense gradients. Training step: "
        "dense SGD with momentum, random 32x32 batch of 64, torchvision models as built (ImageNet stem, "
        "1000-class head).",
        "",
        "| model | prunable weights | clock | RigL.update | engine extras | training step "
        f"| share at every={args.every} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        for clock in ("wall", "cpu"):
            lines.append(
                f"| {name} | {r['weights'] / 1e6:.1f} M | {clock} | {1e3 * r[f'update_{clock}']:.0f} ms | "
                f"{1e3 * r[f'extras_{clock}']:.0f} ms | {1e3 * r[f'step_{clock}']:.0f} ms | "
                f"{100 * r[f'share_{clock}']:.2f} % |"
            )
    r50, r18 = rows[0][1], rows[1][1]
    worst = {c: (r50[f"update_{c}"] + r50[f"extras_{c}"]) / (args.every * r18[f"step_{c}"]) for c in ("wall", "cpu")}
    lines += [
        "",
        "share = (RigL.update + engine extras) / (every x training step), i.e. the fraction of training time",
        "spent in mask updates. Engine extras: copy of the dense gradients and the gradient masking of the update",
        "step, reset of SGD momentum where the masks changed, multiply of the weights by the new masks.",
        "ResNet-50's update against ResNet-18's steps (the most pessimistic pairing): "
        f"{100 * worst['wall']:.2f} % wall, {100 * worst['cpu']:.2f} % CPU.",
        "",
        *command_block(command("bench_rigl_update.py", argv)),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_rigl_update.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
