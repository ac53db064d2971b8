"""Every method's masks on sharded tensors against the same method on the whole tensors, W gloo processes.

Usage: ``python tests/shard_core.py WORLD OUT.json``. Each rank holds the ``torch.chunk`` dim-0 pieces of the
same weights, masks and gradients (FSDP2's layout, uneven and empty pieces included) and calls the method with
``SparsityContext(shards=...)``; rank 0 also calls it on the whole tensors. The pieces are gathered (for the
check only) and compared bitwise. Rank 0 writes ``{case: {"equal": bool, "counts": ..., "budget": ...}}``.
"""

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.core.masks import magnitude_scores, topk_masks  # noqa: E402
from sparsetrain.core.regrowth import drop_and_grow_layers  # noqa: E402
from sparsetrain.core.report import sparsity_report  # noqa: E402
from sparsetrain.core.select import select  # noqa: E402
from sparsetrain.core.layouts import Layout  # noqa: E402
from sparsetrain.core.shards import Piece, Shards, total_counts  # noqa: E402
from sparsetrain.methods import GMP, SET, FixedMasks, GraNet, RigL, Static  # noqa: E402
from sparsetrain.methods.base import SparsityContext  # noqa: E402

SHAPES = {"conv": (5, 1, 3, 3), "fc1": (33, 180), "one": (1, 32), "fc2": (24, 64), "head": (3, 7)}
TOTAL = 200  # steps of the pretend run


def rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """torch.chunk's rows of rank ``rank`` (DTensor's Shard(0) rule)."""
    size = -(-n // world)
    start = min(rank * size, n)
    return start, min(start + size, n)


def piece_of(t, name, rank, world):
    a, b = rows(t.shape[0], rank, world)
    return t[a:b]


def gather(local_masks, shards):
    """The whole masks from the pieces (all_gather_object: verification only)."""
    parts = [None] * shards.world
    dist.all_gather_object(parts, {n: m.cpu() for n, m in local_masks.items()})
    return {n: torch.cat([p[n] for p in parts]).view(shards.pieces[n].shape) for n in local_masks}


def cases():
    nm = {"fc1": (33, 180), "fc2": (24, 64), "one": (1, 32)}  # rows of whole groups of 4
    # groups along dim 0 (HF Conv1D (in, out), ConvTranspose (in, out/g, k, k)): 24 rows give 12 or 8 per rank, whole groups
    dim0 = {"c_attn": (24, 12), "up": (24, 3, 2, 2), "fc1": (24, 64)}
    dim0_layouts = {"c_attn": Layout("hf_conv1d"), "up": Layout("conv_transpose", groups=2), "fc1": Layout("linear")}
    return {
        "static_erk": (Static(0.9, "erk"), "init", None),
        "static_uniform": (Static(0.8, "uniform"), "init", None),
        "static_2:4": (Static(0.5, "uniform", structure="2:4"), "init", nm),
        "gmp_uniform": (GMP(0.9, distribution="uniform", start=0, end=100, every=10), "update", None),
        "gmp_global": (GMP(0.9, distribution="global", start=0, end=100, every=10), "update", None),
        "gmp_global_overrides": (GMP(0.9, distribution="global", overrides={"head": 0.5}, end=100, every=10), "update", None),
        "gmp_2:4_groups": (GMP(0.5, distribution="uniform", end=100, every=10, structure="2:4", structure_schedule="groups"), "update", nm),
        "rigl_erk": (RigL(0.9, every=10, end=150), "update", None),
        "rigl_2:4": (RigL(0.5, "uniform", every=10, end=150, structure="2:4"), "update", nm),
        "rigl_2:4_dim0": (RigL(0.5, "uniform", every=10, end=150, structure="2:4"), "update", dim0, dim0_layouts),
        "gmp_2:4_dim0": (GMP(0.5, distribution="uniform", end=10, every=5, structure="2:4"), "update", dim0, dim0_layouts),
        "set_erk": (SET(0.9, every=10, end=150), "update", None),
        "granet_global": (GraNet(0.9, initial_density=0.5, every=10, start=0, end=100), "update", None),
        "granet_layerwise": (GraNet(0.9, initial_density=0.5, pruning="layerwise", every=10, start=0, end=100), "update", None),
        "fixed": (None, "init", None),
    }


def run(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for case, (method, what, shapes, *layouts) in cases().items():
        shapes, layouts = shapes or SHAPES, (layouts or [None])[0]
        g = torch.Generator().manual_seed(1)
        weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        weights["fc1"][3:9] = 0.0  # ties at |w| = 0 across the two pieces of fc1
        grads["fc1"][10:20] = 0.25
        start = {n: torch.rand(s, generator=g) < 0.5 for n, s in shapes.items()}
        if method is None:
            method = FixedMasks({n: m for n, m in start.items()})
        layout = {n: Piece(s, *rows(s[0], rank, world)) for n, s in shapes.items()}
        shards = Shards(layout, None)
        local = lambda d: {n: piece_of(t, n, rank, world) for n, t in d.items()}  # noqa: E731
        method.setup(TOTAL)
        step = 10 if what == "update" else 0
        if what == "init":
            whole_masks, local_masks = (
                method.init_masks(SparsityContext(weights, None, TOTAL, torch.Generator().manual_seed(7), layouts=layouts)),
                method.init_masks(SparsityContext(local(weights), None, TOTAL, torch.Generator().manual_seed(7), shards=shards, layouts=layouts)),
            )
        else:
            ctx_whole = SparsityContext(weights, None, TOTAL, torch.Generator().manual_seed(7), layouts=layouts)
            init_whole = method.init_masks(ctx_whole)
            init_local = method.init_masks(
                SparsityContext(local(weights), None, TOTAL, torch.Generator().manual_seed(7), shards=shards, layouts=layouts)
            )
            whole_masks = method.update(SparsityContext(weights, init_whole, TOTAL, torch.Generator().manual_seed(8), layouts=layouts), step, grads)
            local_masks = method.update(
                SparsityContext(local(weights), init_local, TOTAL, torch.Generator().manual_seed(8), shards=shards, layouts=layouts),
                step, local(grads),
            )
        gathered = gather(local_masks, shards)
        counts = total_counts(local_masks, shards)
        if layouts is not None:  # the whole masks are 2:4 along dim 0 where the inputs are (so the pieces are too)
            assert all((whole_masks[n].unfold(0, 4, 4).sum(-1) == 2).all() for n in ("c_attn", "up")), case
        if rank == 0:
            results[case] = {
                "equal": all(torch.equal(gathered[n], whole_masks[n]) for n in shapes),
                "counts": counts,
                "whole_counts": {n: int(m.sum()) for n, m in whole_masks.items()},
            }
    # the primitives themselves, with heavy ties and k = 0 / k = N
    g = torch.Generator().manual_seed(2)
    tied = {n: (torch.randint(0, 4, s, generator=g).float() / 2) for n, s in SHAPES.items()}
    layout = {n: Piece(s, *rows(s[0], rank, world)) for n, s in SHAPES.items()}
    shards = Shards(layout, None)
    local = {n: piece_of(t, n, rank, world) for n, t in tied.items()}
    counts = {"conv": 0, "fc1": 2970, "one": 32, "fc2": 700, "head": 21}
    results["topk_ties"] = {"equal": all(
        torch.equal(gather(topk_masks(local, counts, shards), shards)[n], m) for n, m in topk_masks(tied, counts).items()
    )}
    names = list(SHAPES)
    whole = dict(zip(names, select([tied[n] for n in names], [list(range(5))], [4000])))
    got = gather(dict(zip(names, select([local[n] for n in names], [list(range(5))], [4000], shards))), shards)
    results["global_ties"] = {"equal": all(torch.equal(got[n], whole[n]) for n in names)}
    mask = {n: t > 0.4 for n, t in tied.items()}
    k = lambda a: a // 3  # noqa: E731
    dg_whole = drop_and_grow_layers(mask, tied, magnitude_scores(tied), k)
    dg_local = drop_and_grow_layers({n: piece_of(m, n, rank, world) for n, m in mask.items()}, local,
                                    magnitude_scores(local), k, shards=shards)
    results["drop_and_grow_ties"] = {"equal": all(torch.equal(gather(dg_local, shards)[n], dg_whole[n]) for n in names)}
    report = sparsity_report(local, shards)
    results["report"] = {"equal": report.to_dict() == sparsity_report(tied).to_dict()}
    results["bytes_sent"] = shards.bytes_sent
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    world, out = int(sys.argv[1]), sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(run, args=(world, port, out), nprocs=world)
