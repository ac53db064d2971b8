"""Exact distributed top-k by threshold search over float32 bit patterns, without gathering the weights.

    python experiments/fsdp_probe/sharded_topk.py        # 2 gloo processes (torch.multiprocessing)

Every rank holds the dim-0 shard (torch.chunk rule, as DTensor Shard(0)) of L score tensors. Selection
keeps, per *group* of layers (one group per layer = per-layer top-k; one group of all = global top-k),
exactly k[g] positions: all scores above the group's k-th largest value t, and of the scores equal to t
the first ones in (layer order in the group, global flat index) order.

1. keys: float32 -> int32 with the same order (bits, negatives with the 31 low bits flipped), so -inf,
   -1 (the library's NaN/masked conventions), -0 < +0 and +inf are all ordered; NaN must be removed first.
2. radix search: the key range [-2^31, 2^31) is cut into B = 2^b parts per round; each round, one
   all-reduce(SUM) of a G x B int64 histogram -> counts of (key >= candidate); 32/b rounds (b=1: bisection).
3. ties: one all_gather of the L local tie counts; an exclusive prefix over (layer, rank) says how many of
   its ties each rank keeps; a local cumsum keeps the first of them.
"""
import os, socket, sys, time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
BYTES = {"all_reduce": 0, "all_gather": 0, "calls": 0}  # payload bytes sent per rank, per collective kind


def order_key(s):
    """float32 -> int32 key with key(a) < key(b) iff a < b (for non-NaN a, b)."""
    bits = s.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def all_reduce_(t):
    BYTES["all_reduce"] += t.numel() * t.element_size()
    BYTES["calls"] += 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather(t):
    BYTES["all_gather"] += t.numel() * t.element_size()
    BYTES["calls"] += 1
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out)


def threshold_select(local_scores, groups, counts, bits=8):
    """Exact top-k masks of the local shards. local_scores: list of L local tensors; groups: list of lists
    of layer indices (ordered); counts: global keep count per group. Returns the list of local bool masks.

    Radix select: round r histograms the next ``bits`` bits of the keys still inside the group's range
    [lo, lo + span) (one bincount over the survivors, which shrink fast: only the first round reads all)."""
    keys = [order_key(s).reshape(-1) for s in local_scores]
    G, B = len(groups), 1 << bits
    k = torch.tensor(counts, dtype=torch.int64)
    lo = torch.full((G,), -(1 << 31), dtype=torch.int64)  # count(key >= lo) = N >= k
    cnt_hi = torch.zeros(G, dtype=torch.int64)  # count(key >= lo + span): always < k (or k = 0)
    span, alive = 1 << 32, list(keys)
    for r in range(32 // bits):
        step = span // B
        hist, digits = torch.zeros(G, B, dtype=torch.int64), [None] * len(keys)
        for g, layers in enumerate(groups):
            for l in layers:  # digit of every surviving key: which of the B parts of [lo, lo + span) it is in
                a = alive[l]
                digits[l] = (a >> (32 - bits)) + (B // 2) if r == 0 else (a - int(lo[g])) >> (step.bit_length() - 1)
                hist[g] += torch.bincount(digits[l], minlength=B)
        all_reduce_(hist)
        ge = cnt_hi[:, None] + hist.flip(1).cumsum(1).flip(1)  # ge[:, d] = #(key >= lo + d * step)
        j = (ge[:, 1:] >= k[:, None]).sum(1)  # the last part whose lower end still has >= k above it
        cnt_hi = torch.cat([ge[:, 1:], cnt_hi[:, None]], 1).gather(1, j[:, None]).squeeze(1)
        lo, span = lo + j * step, step
        for g, layers in enumerate(groups):
            for l in layers:
                alive[l] = alive[l][digits[l] == j[g]]
    t = lo  # the k-th largest key per group (k = 0: t = 2^31 - 1, nothing is kept)
    need = k - cnt_hi  # ties to keep per group: k - #(key > t)
    L = len(keys)
    t_of = torch.zeros(L, dtype=torch.int64)
    for g, layers in enumerate(groups):
        t_of[layers] = t[g]
    eq = [keys[l] == t_of[l].to(torch.int32) for l in range(L)]
    ties = all_gather(torch.stack([e.sum() for e in eq]))  # (W, L)
    rank = dist.get_rank() if dist.is_initialized() else 0
    masks = [None] * L
    for g, layers in enumerate(groups):
        before = 0  # ties of this group ahead of (layer l, this rank)
        for l in layers:
            prefix = before + int(ties[:rank, l].sum())
            take = max(0, min(int(need[g]) - prefix, int(ties[rank, l])))
            keep = keys[l] > t_of[l].to(torch.int32)
            if take == int(ties[rank, l]):
                keep |= eq[l]
            elif take:  # only the rank where the tie cut falls pays for a cumsum
                keep |= eq[l] & (eq[l].cumsum(0) <= take)
            masks[l] = keep.view(local_scores[l].shape)
            before += int(ties[:, l].sum())
    return masks


def reference(full_scores, groups, counts):
    """The same rule on full tensors in one process, written plainly (sort-based)."""
    masks = [None] * len(full_scores)
    for g, layers in enumerate(groups):
        flat = torch.cat([order_key(full_scores[l]).reshape(-1).long() for l in layers])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        if counts[g]:
            order = torch.sort(-flat, stable=True).indices  # descending key, ties by position
            keep[order[: counts[g]]] = True
        for l, part in zip(layers, keep.split([full_scores[l].numel() for l in layers])):
            masks[l] = part.view(full_scores[l].shape)
    return masks


def best_of(n, fn, sync=True):
    best = float("inf")
    for _ in range(n):
        if sync:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def shard(t, rank, world):
    parts = torch.chunk(t, world, dim=0)
    return parts[rank] if rank < len(parts) else t[t.shape[0]:]


def gather_full(local, shape):
    """Verification only: the full mask from the dim-0 shards (all_gather_object, not counted in BYTES)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return torch.cat(parts).view(shape)


def check(name, full, groups, counts, world, rank, bits):
    local = [shard(s, rank, world) for s in full]
    got = [gather_full(m, s.shape) for m, s in zip(threshold_select(local, groups, counts, bits), full)]
    ref = reference(full, groups, counts)
    exact = all(int(sum(got[l].sum() for l in layers)) == counts[g] for g, layers in enumerate(groups))
    same = all(torch.equal(a, b) for a, b in zip(got, ref))
    from sparsetrain.core.masks import global_topk_masks, topk_masks
    if len(groups) == 1:
        tk = list(global_topk_masks({str(i): s for i, s in enumerate(full)}, counts[0]).values())
    else:
        tk = list(topk_masks({str(i): s for i, s in enumerate(full)}, {str(g[0]): c for g, c in zip(groups, counts)}).values())
    same_tk = all(torch.equal(a, b) for a, b in zip(got, tk))
    if rank == 0:
        print(f"{name:<34} b={bits}: counts exact {exact}; == reference rule {same}; == torch.topk masks {same_tk}")
    return exact and same


def run(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 1, 3, 3), (33, 180), (1, 33), (64, 64, 3, 3), (3, 7)]
    cont = [torch.randn(s, generator=g).abs() for s in shapes]  # no ties (almost surely)
    tied = [torch.randint(0, 6, s, generator=g).float() / 4 for s in shapes]  # heavy ties, zeros
    special = [c.masked_fill(c < 0.3, float("-inf")).masked_fill(c > 2.5, -1.0) for c in cont]  # -inf / -1 scores
    counts = [0, 2970, 33, 18432, 21]  # k = 0, ..., k = N
    per_layer, one = [[l] for l in range(len(shapes))], [list(range(len(shapes)))]
    ok = True
    for bits in (1, 4, 8):
        ok &= check("per-layer, continuous", cont, per_layer, counts, world, rank, bits)
        ok &= check("per-layer, ties", tied, per_layer, counts, world, rank, bits)
        ok &= check("per-layer, -inf/-1 scores", special, per_layer, [c // 3 for c in counts], world, rank, bits)
        ok &= check("global, continuous", cont, one, [9000], world, rank, bits)
        ok &= check("global, ties", tied, one, [9000], world, rank, bits)
    # RigL drop/grow on shards = two threshold selections; compare with sparsetrain.core.regrowth.drop_and_grow
    from sparsetrain.core.regrowth import drop_and_grow
    w = [torch.randn(s, generator=g) for s in shapes]
    gr = [torch.randn(s, generator=g) for s in shapes]
    m = [torch.rand(s, generator=g) < 0.3 for s in shapes]
    n_act = [int(x.sum()) for x in m]
    kdrop = [int(0.3 * n) for n in n_act]
    loc = lambda xs: [shard(x, rank, world) for x in xs]  # noqa: E731
    drop_scores = [x.abs().masked_fill(~mm, float("-inf")) for x, mm in zip(loc(w), loc(m))]
    kept = threshold_select(drop_scores, per_layer, [n - k for n, k in zip(n_act, kdrop)])
    grow_scores = [x.abs().masked_fill(kk, float("-inf")) for x, kk in zip(loc(gr), kept)]
    grown = threshold_select(grow_scores, per_layer, kdrop)
    new = [gather_full(a | b, s) for a, b, s in zip(kept, grown, shapes)]
    want = [drop_and_grow(mm, ww, gg, k) for mm, ww, gg, k in zip(m, w, gr, kdrop)]
    same = all(torch.equal(a, b) for a, b in zip(new, want))
    if rank == 0:
        print(f"RigL drop/grow on shards == core.regrowth.drop_and_grow: {same}; counts kept {[int(x.sum()) for x in new] == n_act}")
    ok &= same
    # cost: ResNet-50-like big layers, 5.6 M weights; per-layer top-k at 10 % density
    big = [(512, 512, 3, 3), (2048, 512), (1000, 2048), (128, 128, 3, 3), (64, 64, 3, 3)]
    full = [torch.randn(s, generator=g).abs() for s in big]
    local = [shard(s, rank, world) for s in full]
    ks = [s.numel() // 10 for s in full]
    P = sum(s.numel() for s in full)
    for bits in (1, 4, 8):
        for key in BYTES:
            BYTES[key] = 0
        dt = best_of(3, lambda: threshold_select(local, [[l] for l in range(len(big))], ks, bits))
        if rank == 0:
            BYTES.update({key: v // 3 for key, v in BYTES.items()})
            print(f"cost b={bits}: {dt * 1e3:7.1f} ms for {P / 1e6:.2f} M weights ({world} ranks); per rank sent: "
                  f"all_reduce {BYTES['all_reduce']} B + all_gather {BYTES['all_gather']} B in {BYTES['calls']} calls")
    def gather_topk():
        parts = [[torch.empty_like(shard(s, r, world)) for r in range(world)] for s in full]
        for s, p in zip(local, parts):
            dist.all_gather(p, s.contiguous())
        [torch.topk(torch.cat(p).reshape(-1), k, sorted=False) for p, k in zip(parts, ks)]
    dt = best_of(3, gather_topk)
    if rank == 0:
        print(f"cost gather scores + torch.topk: {dt * 1e3:7.1f} ms; per rank sent {P // world * 4} B (fp32 scores)")
        one = best_of(3, lambda: [torch.topk(s.reshape(-1), k, sorted=False) for s, k in zip(full, ks)], sync=False)
        BYTES.update({key: 0 for key in BYTES})
        dist.destroy_process_group()  # threshold_select with no process group = the one-process path
        thr = best_of(3, lambda: threshold_select(full, [[l] for l in range(len(big))], ks, 8), sync=False)
        print(f"cost one process, full tensors: torch.topk {one * 1e3:7.1f} ms; threshold_select b=8 {thr * 1e3:7.1f} ms")
        print("ALL CHECKS PASSED" if ok else "SOME CHECK FAILED")
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port), nprocs=2, join=True)
