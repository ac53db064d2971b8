"""Counter-based random scores: a shard draws exactly the numbers an unsharded run draws for its indices.

    python experiments/fsdp_probe/counter_random.py     # checks in one process, then 2 gloo ranks + DTensor

u(seed, layer, counter, i) for global flat index i of a layer = SplitMix64 stream of a per-(seed, layer,
counter) key: z_i = mix64(key + (i + 1) * GAMMA), u = top 24 bits of z_i / 2^24 in [0, 1) (exact in
float32). All in torch int64 arithmetic (multiplication wraps mod 2^64; logical right shifts are masked
arithmetic shifts), so it runs on any device and never touches the global RNG. ``counter`` separates draws
of the same layer (e.g. the update step of SET's random growth).
"""
import math, os, socket, time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _s64(c):  # an unsigned 64-bit constant as the int64 with the same bits
    return c - (1 << 64) if c >= 1 << 63 else c


GAMMA, M1, M2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)
CHUNK = 1 << 16  # elements per piece: two 512 KiB int64 scratch tensors, reused, stay in cache


def _srl(z, s):  # logical shift right of int64
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z, tmp=None):
    """SplitMix64 finalizer, in place on the int64 tensor ``z`` (``tmp``: a scratch tensor like it)."""
    tmp = torch.empty_like(z) if tmp is None else tmp
    for s, m in ((30, M1), (27, M2), (31, None)):
        torch.bitwise_right_shift(z, s, out=tmp).bitwise_and_((1 << (64 - s)) - 1)
        z.bitwise_xor_(tmp)
        if m is not None:
            z.mul_(m)
    return z


def stream_key(seed, layer, counter=0):
    z = torch.tensor([seed], dtype=torch.int64)
    for part in (layer, counter):
        z = mix64(mix64(z).add_(part))
    return int(z)


def flat_indices(global_shape, local_shape, offset):
    """Global row-major flat indices of the block [offset, offset + local_shape) (any dims sharded)."""
    stride = [math.prod(global_shape[d + 1 :]) for d in range(len(global_shape))]
    idx = torch.zeros((), dtype=torch.int64)
    for d, (n, o) in enumerate(zip(local_shape, offset)):
        ax = (torch.arange(n, dtype=torch.int64) + o) * stride[d]
        idx = idx.unsqueeze(-1) + ax
    return idx.reshape(-1)


def uniform_from_index(key, idx, start=None, count=None, device="cpu"):
    """u in [0, 1) as float32 (24 bits) for the int64 flat indices ``idx`` of the stream ``key``, or for
    the range [start, start + count) (no index tensor: the dim-0 shard case)."""
    total = idx.numel() if idx is not None else count
    device = idx.device if idx is not None else device
    out = torch.empty(total, dtype=torch.float32, device=device)
    z, tmp = (torch.empty(min(CHUNK, total), dtype=torch.int64, device=device) for _ in range(2))
    for lo in range(0, total, CHUNK):
        n = min(CHUNK, total - lo)
        zz, tt = z[:n], tmp[:n]
        if idx is None:
            torch.arange(start + lo + 1, start + lo + n + 1, dtype=torch.int64, out=zz)
        else:
            torch.add(idx[lo : lo + n], 1, out=zz)
        zz.mul_(GAMMA).add_(key)
        mix64(zz, tt)
        torch.bitwise_right_shift(zz, 40, out=tt).bitwise_and_((1 << 24) - 1)
        out[lo : lo + n] = tt  # int64 < 2^24 -> float32 exactly
    return out.mul_(2.0**-24)


def shard_uniform(seed, layer, global_shape, local_shape, offset, counter=0):
    """The scores of one shard: exactly those of the full tensor at the shard's global indices."""
    if len(global_shape) and offset[1:] == (0,) * (len(offset) - 1) and tuple(local_shape[1:]) == tuple(global_shape[1:]):
        start = offset[0] * math.prod(global_shape[1:])  # dim-0 shard (FSDP2 default): one contiguous range
        return uniform_from_index(stream_key(seed, layer, counter), None, start, math.prod(local_shape)).view(local_shape)
    idx = flat_indices(global_shape, local_shape, offset)
    return uniform_from_index(stream_key(seed, layer, counter), idx).view(local_shape)


def full_uniform(seed, layer, shape, counter=0):
    return shard_uniform(seed, layer, tuple(shape), tuple(shape), (0,) * len(shape), counter)


def chunk_blocks(shape, world, dim):
    """(local_shape, offset) of every rank under torch.chunk along ``dim`` (DTensor's Shard(dim) rule)."""
    size = -(-shape[dim] // world)
    out = []
    for r in range(world):
        start = min(r * size, shape[dim])
        n = max(0, min(size, shape[dim] - start))
        out.append((shape[:dim] + (n,) + shape[dim + 1 :], (0,) * dim + (start,) + (0,) * (len(shape) - dim - 1)))
    return out


def single_process_checks():
    shapes = [(5, 1, 3, 3), (33, 180), (1, 33), (64, 64, 3, 3), (7,)]
    ok = True
    for l, shape in enumerate(shapes):
        full = full_uniform(1234, l, shape)
        for world in (2, 3, 4):
            for dim in range(len(shape)):
                for local_shape, off in chunk_blocks(shape, world, dim):
                    part = shard_uniform(1234, l, shape, local_shape, off)
                    sl = tuple(slice(o, o + n) for o, n in zip(off, local_shape))
                    ok &= torch.equal(part.view(-1).view(torch.int32), full[sl].reshape(-1).view(torch.int32))
    print(f"sharded == unsharded bitwise (5 shapes, world 2/3/4, every shard dim): {ok}")
    u = full_uniform(0, 0, (4096, 1024))
    v, w = full_uniform(0, 1, (4096, 1024)), full_uniform(0, 0, (4096, 1024), counter=1)
    x = u.view(-1).double()
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a.reshape(-1).double(), b.reshape(-1).double()]))[0, 1])  # noqa: E731
    hist = torch.histc(x, bins=64, min=0, max=1)
    chi2 = float(((hist - x.numel() / 64) ** 2 / (x.numel() / 64)).sum())
    print(f"4 M draws: min {float(x.min()):.2e} max {float(x.max()):.7f} mean {float(x.mean()):.5f} (0.5) "
          f"std {float(x.std()):.5f} ({1 / math.sqrt(12):.5f}); chi2 over 64 bins {chi2:.1f} (63 dof: 63 +- 11); "
          f"corr(i, i+1) {corr(x[:-1], x[1:]):+.1e}; corr(layer 0, layer 1) {corr(u, v):+.1e}; "
          f"corr(counter 0, 1) {corr(u, w):+.1e} (1 sigma {1 / math.sqrt(x.numel()):.1e}); distinct 24-bit values {x.unique().numel()} of {x.numel()}")
    n = 10_000_000
    torch.set_num_threads(1)
    for name, fn in [("torch.rand (mt19937)", lambda: torch.rand(n, generator=torch.Generator().manual_seed(0))),
                     ("counter hash, dim-0 shard", lambda: shard_uniform(1, 2, (n // 1000, 1000), (n // 1000, 1000), (0, 0))),
                     ("counter hash, general N-D", lambda: uniform_from_index(7, flat_indices((n // 1000, 1000), (n // 1000, 1000), (0, 0))))]:
        best = min(_time(fn) for _ in range(3))
        print(f"{name:<28} {best * 1e9 / n:5.2f} ns/weight (10 M weights, 1 thread)")
    return ok


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dtensor_check(rank, world, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    ok = True
    for l, shape in enumerate([(33, 180), (1, 33), (5, 1, 3, 3), (64, 64, 3, 3)]):
        for placement in (Shard(0), Shard(1)):
            local_shape, off = compute_local_shape_and_global_offset(shape, mesh, [placement])
            mine = shard_uniform(99, l, shape, tuple(local_shape), tuple(off))
            dt = DTensor.from_local(mine, mesh, [placement], run_check=False, shape=torch.Size(shape),
                                    stride=torch.empty(shape).stride())
            full = full_uniform(99, l, shape)
            ok &= torch.equal(dt.full_tensor(), full)
            ok &= torch.equal(distribute_tensor(full, mesh, [placement]).to_local(), mine)
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"2 gloo ranks, DTensor Shard(0)/Shard(1): local draws == distribute_tensor(full).to_local() and "
              f"from_local(...).full_tensor() == unsharded draws: {bool(flag)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    single_process_checks()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(dtensor_check, args=(2, port), nprocs=2, join=True)
