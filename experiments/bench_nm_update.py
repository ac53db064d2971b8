"""Cost of N:M mask updates against unstructured ones, and against a dense training step.

For torchvision ResNet-50 (its 2:4-able targets: every conv but the 3x7x7 stem, and the fc;
25.5 M weights) on the CPU, at 50 % sparsity (2:4) and 75 % (1:4), each mask computation of the
library as the methods call it:

* ``Static / final GMP mask``: ``Budget.masks`` of ``|w|`` at ``1 - N/M``: unstructured per-layer
  top-k vs the N:M top-N of every group;
* ``GMP on the way``: ``Budget.masks`` at 70 % of the final sparsity: unstructured top-k vs top-k
  with the N largest of every group protected (one extra group top-N pass);
* ``RigL update``: ``RigL.update`` at drop fraction 0.3 (the first update's): unstructured drop and
  grow vs drop and per-group refill;
* ``SR-STE mask``: what SR-STE adds to every training step (``every=1``): the N:M mask of ``|w|``.

The dense training step (SGD with momentum, a random 32x32 batch of 64, forward + backward + step)
is timed in turn with the updates, so the ratios compare numbers taken under the same load.
Medians of ``--repeats`` runs after a warm-up, one thread by default. Usage::

    python experiments/bench_nm_update.py                  # writes experiments/results/bench_nm_update.md
    python experiments/bench_nm_update.py --repeats 3 --out /tmp/nm
"""

from __future__ import annotations

import platform
import statistics

import torch
import torchvision

from common import command, command_block, dense_sgd_step, parser, timed
from sparsetrain.core.masks import magnitude_scores
from sparsetrain.core.targets import select_targets
from sparsetrain.methods import GMP, RigL, SparsityContext, Static


def cases(targets: dict, grads: dict, structure: str | None, sparsity: float) -> dict:
    """The mask computations of one column (``structure=None``: unstructured at ``sparsity``)."""
    kw = dict(distribution="uniform", structure=structure, indivisible="dense")
    static = Static(sparsity, **kw)
    gmp = GMP(sparsity, start=0, end=10, every=1, **kw)
    gmp.setup(10)
    rigl = RigL(sparsity, every=1, end=100, **kw)
    rigl.setup(100)
    generator = torch.Generator().manual_seed(0)
    masks = static.init_masks(SparsityContext(targets, None, None, generator))
    ctx = SparsityContext(targets, masks, 100, generator)
    partial = gmp._budget_at(0).with_overrides({})  # the budget object GMP uses on the way
    halfway = 0.7 * sparsity
    return {
        "Static / final GMP mask": lambda: static.budget.masks(magnitude_scores(targets), sparsity),
        "GMP on the way": lambda: partial.masks(magnitude_scores(targets), halfway),
        "RigL update": lambda: rigl.update(ctx, 1, grads),
        "SR-STE mask": (lambda: static.budget.masks(magnitude_scores(targets), sparsity)) if structure else None,
    }


def main(argv=None) -> None:
    args = parser(__doc__)
    args.add_argument("--repeats", type=int, default=5)
    args = args.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    targets = {n: p.detach() for n, p in select_targets(model).items()}
    grads = {n: torch.randn_like(p) for n, p in targets.items()}
    step = dense_sgd_step(model)

    columns = {"unstructured 50 %": (None, 0.5), "2:4": ("2:4", 0.5), "unstructured 75 %": (None, 0.75), "1:4": ("1:4", 0.75)}
    fns = {c: cases(targets, grads, *v) for c, v in columns.items()}
    step()
    times: dict = {(c, k): [] for c in fns for k, f in fns[c].items() if f is not None}
    steps = []
    for fs in fns.values():  # warm-up
        for f in fs.values():
            f() if f is not None else None
    for _ in range(args.repeats):
        steps.append(timed(step)[0])
        for (c, k) in times:
            times[(c, k)].append(timed(fns[c][k])[0])
    step_ms = 1e3 * statistics.median(steps)
    weights = sum(p.numel() for p in targets.values())
    lines = [
        "# Cost of N:M mask updates (ResNet-50, CPU)",
        "",
        f"CPU ({platform.machine()}, {args.threads} thread(s), torch {torch.__version__}), {weights / 1e6:.1f} M prunable "
        f"weights (the stem stays dense under N:M: 3 x 7 x 7 = 147 inputs); medians of {args.repeats} runs after a "
        f"warm-up, on a machine shared with other jobs. Dense training step (SGD, batch 64 at 32x32): {step_ms:.0f} ms. "
        "Each cell: milliseconds, and in brackets the time over one dense training step.",
        "",
        "| mask computation | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for k in fns["2:4"]:
        cells = []
        for c in columns:
            if (c, k) not in times:
                cells.append("—")
                continue
            ms = 1e3 * statistics.median(times[(c, k)])
            cells.append(f"{ms:.0f} ms ({ms / step_ms:.2f}x)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "SR-STE recomputes its mask after every step: its column is its per-step overhead (the forward's",
              "`w * mask` and the decay term add one elementwise pass each). Static, GMP and RigL compute masks only",
              "at updates (every 100 steps or so), so their cost per step is the cell divided by `every`.",
              "", *command_block(command("bench_nm_update.py", argv))]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_nm_update.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
