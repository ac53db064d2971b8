"""What sparse training's masks cost at scale: memory per rank, communication per mask update,
checkpoint size, for Llama-2 7B and 70B on 64 to 1024 GPUs. Arithmetic from the formulas below,
no measurement. Usage::

    python experiments/scale_costs.py            # writes experiments/results/scale_costs.md
    python experiments/scale_costs.py --out /tmp

For a model with ``L`` targets holding ``P`` prunable weights on ``W`` ranks:

* mask memory per rank: replicated (every rank holds every mask, as under DDP today) ``P`` bytes
  as ``bool`` (1 B per weight), ``P / 8`` bit-packed; sharded (each rank holds the masks of its
  shard of the weights, as FSDP shards the weights) ``P / W`` and ``P / (8 W)``;
* a selection by the distributed threshold search of ``sparsetrain.core.select`` (what is
  implemented: a radix select over the 32 bits of a float32 score, 8 bits per round): 4 rounds,
  each one all-reduce of a ``G x 256`` int64 histogram (``G`` groups: 1 for a global threshold,
  ``L`` for per-layer top-k), then one all-gather of ``L`` int64 tie counts. Sent per rank:
  ``4 * G * 256 * 8 + 8 L`` bytes; received by the all-gather ``8 L W``. A global top-k is
  ``8 KiB + 8 L``; a per-layer one ``8 KiB * L + 8 L``; RigL's drop and grow are two per-layer
  selections plus one all-reduce of ``8 L`` bytes of counts. Against an all-gather of the full
  weights (``2 P (W - 1) / W`` bytes received per rank in bf16);
* mask agreement check (``sparsetrain.core.fingerprint``): one all-reduce of ``2 L`` int64 (``16 L``
  bytes), against an all-gather of every rank's ``2 L`` int64 (``16 L W`` bytes received per rank);
* checkpoint: the masks add ``P`` bytes as ``bool`` (``P / 8`` bit-packed), sharded or not; for
  scale, the prunable weights' own training state is 14 bytes each (bf16 weights 2, fp32 master
  copy 4, Adam moments 2 x 4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {  # name: (targets L, prunable weights P)
    "Llama-2 7B": (225, 6.6e9),
    "Llama-2 70B": (561, 68.7e9),
}
WORLD_SIZES = (64, 128, 256, 512, 1024)
ROUNDS, BINS = 4, 256  # radix select: 8 bits per round (sparsetrain.core.select)
TRAIN_STATE_BYTES = 14  # per weight: bf16 weight + fp32 master + 2 fp32 Adam moments


def costs(targets: int, weights: float, world: int) -> dict[str, float]:
    """Bytes for one model on ``world`` ranks (see the module docstring for each formula)."""
    return {
        "replicated_bool": weights,
        "replicated_packed": weights / 8,
        "sharded_bool": weights / world,
        "sharded_packed": weights / (8 * world),
        "search_global": ROUNDS * BINS * 8 + 8 * targets,
        "search_layers": ROUNDS * BINS * 8 * targets + 8 * targets,
        "ties_received": 8 * targets * world,
        "gather_weights": 2 * weights * (world - 1) / world,
        "check": 16 * targets,
        "check_gather": 16 * targets * world,
        "ckpt_bool": weights,
        "ckpt_packed": weights / 8,
        "ckpt_state": TRAIN_STATE_BYTES * weights,
    }


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def table() -> str:
    lines = [
        "# Cost of the masks at scale",
        "",
        "Made by `python experiments/scale_costs.py` (arithmetic, not a measurement; formulas in the script's "
        "docstring and in docs/distributed.md). L = targets, P = prunable weights, W = GPUs (ranks); 1 GB = 1e9 bytes.",
        "",
        "## Mask memory per rank",
        "",
        "| model | L | P | W | replicated, bool (P) | replicated, bit-packed (P/8) | sharded, bool (P/W) "
        "| sharded, bit-packed (P/8W) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (targets, weights) in MODELS.items():
        for world in WORLD_SIZES:
            c = costs(targets, weights, world)
            lines.append(
                f"| {name} | {targets} | {weights:.3g} | {world} | {human(c['replicated_bool'])} "
                f"| {human(c['replicated_packed'])} | {human(c['sharded_bool'])} | {human(c['sharded_packed'])} |"
            )
    lines += [
        "",
        "## Communication per mask update (independent of W except where noted)",
        "",
        "| model | global top-k, sent (4 x 256 x 8 B + 8 L, 4 all-reduces + 1 all-gather) | per-layer top-k, sent "
        "(4 x 256 x 8 L + 8 L) | tie counts received (8 L W, W = 64 / 1024) | instead: all-gather of the "
        "full bf16 weights, received per rank (2P(W-1)/W, W = 1024) | agreement check (one all-reduce of 16 L B) "
        "| instead: all-gather of the hashes, received per rank (16 L W, W = 64 / 1024) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (targets, weights) in MODELS.items():
        c64, c1024 = costs(targets, weights, 64), costs(targets, weights, 1024)
        lines.append(
            f"| {name} | {human(c1024['search_global'])} | {human(c1024['search_layers'])} "
            f"| {human(c64['ties_received'])} / {human(c1024['ties_received'])} | {human(c1024['gather_weights'])} "
            f"| {human(c1024['check'])} | {human(c64['check_gather'])} / {human(c1024['check_gather'])} |"
        )
    lines += [
        "",
        "## Checkpoint",
        "",
        "| model | masks as bool (P) | masks bit-packed (P/8) | for scale: training state of the prunable weights (14 P) "
        "| masks' share, bool / bit-packed |",
        "|---|---|---|---|---|",
    ]
    for name, (targets, weights) in MODELS.items():
        c = costs(targets, weights, 1)
        lines.append(
            f"| {name} | {human(c['ckpt_bool'])} | {human(c['ckpt_packed'])} | {human(c['ckpt_state'])} "
            f"| {c['ckpt_bool'] / (c['ckpt_state'] + c['ckpt_bool']):.1%} / "
            f"{c['ckpt_packed'] / (c['ckpt_state'] + c['ckpt_packed']):.1%} |"
        )
    lines += [
        "",
        "A sharded checkpoint holds the same total, split over W files (P/W or P/8W bytes of masks each).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = table()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_costs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
