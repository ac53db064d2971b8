"""Probe: sparse-training masks under FSDP2 (fully_shard) + Lightning ModelParallelStrategy, CPU/gloo, 2 ranks.

    python experiments/fsdp_probe/probe.py          # prints [rankN] OK/FAIL/INFO lines; see FINDINGS.md
    python experiments/fsdp_probe/probe.py --full   # the same with save_distributed_checkpoint=False

Fit 1 (3 steps) probes DTensor params, grads, optimizer state, masking on local shards, collectives and the
checkpoint (a DCP folder); fit 2 resumes from it (2 more steps) and checks what comes back on every rank.
"""
import copy, math, os, shutil, sys, tempfile

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

FULL = "--full" in sys.argv  # the launcher re-runs this script with the same argv on rank 1
CKPT = os.path.join(tempfile.gettempdir(), "fsdp_probe_ckpt" + (".ckpt" if FULL else ""))
KEY = "_sparsetrain.mask."  # prefix of the packed masks that ride along in checkpoint["state_dict"] (DCP)
SEEN = {}  # per process: what fit 1 left behind, compared after the resume (same processes run both fits)


def say(*a):  # one write per line, so that the two ranks' lines do not interleave
    sys.stdout.write(f"[rank{dist.get_rank() if dist.is_initialized() else '-'}] " + " ".join(map(str, a)) + "\n")
    sys.stdout.flush()


def attempt(label, fn):
    try:
        say(f"OK   {label}: {fn()}")
    except Exception as e:  # noqa: BLE001 - the probe reports every failure
        say(f"FAIL {label}: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}")


def shard_slice(p):
    """Local shape and global offset of this rank's shard -> the slice of the full tensor it holds."""
    shape, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + s) for o, s in zip(off, shape)), shape, off


def full_mask(shape):  # a mask defined by the global flat index, the same on every rank
    return (torch.arange(math.prod(shape)) % 3 != 0).view(shape)


def pack_rows(m):  # bool (R, ...) -> uint8 (R, ceil(C/8)): row-wise bit packing keeps dim-0 sharding intact
    m = m.reshape(m.shape[0], math.prod(m.shape[1:]))
    c8 = -(-m.shape[1] // 8) * 8
    bits = F.pad(m.to(torch.uint8), (0, c8 - m.shape[1])).view(m.shape[0], c8 // 8, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_rows(b, shape):
    bits = (b.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.view(b.shape[0], b.shape[1] * 8)[:, : math.prod(shape[1:])].bool().view(shape)


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()  # 5 conv channels (3/2 rows), 33 (17/16) and 1 (1/0: an empty shard) output rows
        self.net = nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(180, 33), nn.ReLU(), nn.Linear(33, 1))

    def configure_model(self):
        if isinstance(self.net[0].weight, DTensor): return  # noqa: E701
        self.__dict__["ref"] = copy.deepcopy(self.net)  # unsharded copy (not a submodule) for checking grads
        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, i):
        self.last_batch = batch
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randn(64, 1, generator=g))
        return torch.utils.data.DataLoader(ds, batch_size=8)


class Probe(pl.Callback):
    def __init__(self, resume=False):
        self.resume, self.masks, self.loaded = resume, {}, None

    def weights(self, pl_module):
        return {n: p for n, p in pl_module.named_parameters() if p.dim() > 1}

    # ------------------------------------------------------------------ fit 1
    @torch.no_grad()
    def on_fit_start(self, trainer, pl_module):
        say(f"INFO hook on_fit_start (resume={self.resume}); load_state_dict called yet: {self.loaded is not None}")
        if self.resume:
            return
        mesh = pl_module.device_mesh
        say(f"INFO mesh {mesh} dims={mesh.mesh_dim_names} same as strategy's: {mesh is trainer.strategy.device_mesh}; "
            f"dp size={mesh['data_parallel'].size()} dp rank={mesh['data_parallel'].get_local_rank()}")
        for n, p in pl_module.named_parameters():
            sl, shape, off = shard_slice(p)
            say(f"INFO {n}: {type(p).__name__} global {tuple(p.shape)} placements {p.placements} local "
                f"{tuple(p.to_local().shape)} computed local {shape} offset {off}")
        dp = mesh["data_parallel"]
        for n, p in self.weights(pl_module).items():
            m = full_mask(p.shape)
            self.masks[n] = m[shard_slice(p)[0]].clone()
            before = p.full_tensor()
            p.to_local().mul_(self.masks[n])  # the masking that works: plain tensor on the local shard
            say(f"INFO {n}: to_local() aliases the shard: {p.to_local().data_ptr() == p._local_tensor.data_ptr()}; "
                f"full_tensor() after local mul_ == w*mask: {torch.equal(p.full_tensor(), before * m)}")
        p = pl_module.net[3].weight  # 33 x 180, uneven 17/16
        m, ml = full_mask(p.shape), self.masks["net.3.weight"]
        md = DTensor.from_local(ml, dp, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        attempt("p.mul_(plain full mask)", lambda: p.mul_(m) is p)
        attempt("p.mul_(plain local mask)", lambda: p.mul_(ml) is p)
        attempt("p[~mask] = 0 (index_put_, plain mask)", lambda: p.__setitem__(~m, 0.0))
        attempt("torch._foreach_mul_([p], [plain mask])", lambda: torch._foreach_mul_([p], [m]))
        attempt("torch.nonzero(p)", lambda: tuple(torch.nonzero(p).shape))
        attempt("torch.topk(p.flatten(), 5)", lambda: torch.topk(p.flatten(), 5).values.placements)
        attempt("torch.topk(p.abs(), 5, dim=1) (along an unsharded dim)", lambda: torch.topk(p.abs(), 5, dim=1).values.placements)
        attempt("torch.topk(p.abs(), 5, dim=0) (along the sharded dim)", lambda: torch.topk(p.abs(), 5, dim=0).values.placements)
        attempt("DTensor.from_local(mask) == distribute_tensor(full mask)",
                lambda: torch.equal(md.to_local(), distribute_tensor(m, dp, p.placements).to_local()))
        self.dt_example = md
        attempt("p.mul_(DTensor mask)", lambda: (p.mul_(md), torch.equal(p.full_tensor() != 0, (p.full_tensor() != 0) & m))[1])
        attempt("torch._foreach_mul_([p], [DTensor mask])", lambda: (torch._foreach_mul_([p], [md]), "done")[1])
        attempt("p[~DTensor mask] = 0", lambda: p.__setitem__(~md, 0.0))
        attempt("(DTensor mask).sum() placements / to_local() / full_tensor()",
                lambda: (md.sum().placements, int(md.sum().to_local()), int(md.sum().full_tensor()), int(m.sum())))
        counts = torch.stack([k.sum() for k in self.masks.values()])  # L local counts -> one all-reduce(SUM)
        dist.all_reduce(counts, group=dp.get_group())
        say(f"INFO per-layer kept counts, local sums + one all_reduce: {counts.tolist()} "
            f"expected {[int(full_mask(q.shape).sum()) for q in self.weights(pl_module).values()]}")
        t = torch.tensor([dist.get_rank() + 1], dtype=torch.int64)
        attempt("strategy.reduce(int64, 'sum') (in place, barrier first)", lambda: trainer.strategy.reduce(t.clone(), reduce_op="sum").tolist())
        attempt("strategy.reduce(float, 'mean')", lambda: trainer.strategy.reduce(t.double(), reduce_op="mean").tolist())
        attempt("strategy.all_gather(int64 [1])", lambda: trainer.strategy.all_gather(t).tolist())
        attempt("dist.all_reduce(t, group=mesh['data_parallel'].get_group())", lambda: (dist.all_reduce(u := t.clone(), group=dp.get_group()), u.tolist())[1])
        attempt("strategy.broadcast(obj)", lambda: trainer.strategy.broadcast({"r": dist.get_rank()}))

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.resume or trainer.global_step > 0:  # later steps: just mask the grads on the local shards
            for n, p in self.weights(pl_module).items():
                p.grad.to_local().mul_(self.masks[n])
            return
        ref, (x, y) = pl_module.ref, pl_module.last_batch
        for (n, p), q in zip(pl_module.net.named_parameters(), ref.parameters()):
            q.copy_(p.full_tensor())
        with torch.enable_grad():
            F.mse_loss(ref(x), y).backward()  # this rank's batch, unsharded model
        for (n, p), q in zip(pl_module.net.named_parameters(), ref.parameters()):
            total = q.grad.clone()
            dist.all_reduce(total)
            g = p.grad
            say(f"INFO grad net.{n}: {type(g).__name__} {g.placements} local {tuple(g.to_local().shape)}; "
                f"== mean of rank grads: {torch.allclose(g.full_tensor(), total / 2, atol=1e-6)}, "
                f"== sum: {torch.allclose(g.full_tensor(), total, atol=1e-6)}")
            if f"net.{n}" in self.masks:
                g.to_local().mul_(self.masks[f"net.{n}"])
                say(f"INFO grad net.{n}: after g.to_local().mul_(mask) full_tensor zero off-mask: "
                    f"{bool((g.full_tensor()[~full_mask(p.shape)] == 0).all())}")

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        for n, p in self.weights(pl_module).items():
            off = p.full_tensor()[~full_mask(p.shape)]
            state = opt.state[p]
            if batch_idx == 0 and not self.resume:
                say(f"INFO optim state {n}: " + ", ".join(
                    f"{k}: {type(v).__name__}{getattr(v, 'placements', '')} {tuple(v.shape)}" for k, v in state.items()))
                state["exp_avg"].to_local().mul_(self.masks[n])  # reset state off the mask, on the local shard
                say(f"INFO optim state {n}: exp_avg zero off-mask after local mul_: "
                    f"{bool((state['exp_avg'].full_tensor()[~full_mask(p.shape)] == 0).all())}")
            say(f"INFO step {trainer.global_step} {n}: masked weights still 0 after fwd/bwd/step: {bool((off == 0).all())}")
            if not self.resume:
                SEEN[n] = p.full_tensor().clone()

    # ------------------------------------------------------------ checkpoint
    def state_dict(self):
        """Called on every rank; ModelParallelStrategy writes only rank 0's copy (into meta.pt)."""
        rank = dist.get_rank()
        out = {"rank": rank, "local_tensor": torch.full((2,), rank), "dtensor": getattr(self, "dt_example", None)}
        if self.masks:  # variant B: gather the packed masks into the state (one all_gather_object, rank 0 keeps it)
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, {n: pack_rows(m) for n, m in self.masks.items()})
            out["packed_full"] = {n: torch.cat([q[n] for q in parts]) for n in self.masks}
        return out

    def load_state_dict(self, state):
        self.loaded = state
        d = state["dtensor"]
        say(f"INFO hook load_state_dict: got rank={state['rank']} local_tensor={state['local_tensor'].tolist()} "
            f"dtensor: {type(d).__name__} local rows {d.to_local().shape[0]} (rank 0's shard: {d.to_local().shape[0] == 17})")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """Variant A: packed masks as DTensors (the weight's dim-0 sharding) inside checkpoint['state_dict'] -> DCP."""
        values = list(checkpoint["state_dict"].values())
        say(f"INFO on_save_checkpoint: checkpoint['state_dict'] has {len(values)} entries, DTensors: "
            f"{bool(values) and isinstance(values[0], DTensor)}")
        if FULL:  # full state dict on rank 0 only (empty elsewhere): a rank-local DTensor must not go in
            return
        for n, p in self.weights(pl_module).items():
            b = pack_rows(self.masks[n])
            checkpoint["state_dict"][KEY + n] = DTensor.from_local(
                b, p.device_mesh, p.placements, run_check=False, shape=(p.shape[0], b.shape[1]), stride=(b.shape[1], 1))

    def on_train_start(self, trainer, pl_module):
        say(f"INFO hook on_train_start; load_state_dict called: {self.loaded is not None}")
        if not self.resume:
            return
        for n, p in self.weights(pl_module).items():
            say(f"INFO resume {n}: weights == end of fit 1: {torch.equal(p.full_tensor(), SEEN[n])}")
        if FULL:
            for n, p in self.weights(pl_module).items():
                sl = shard_slice(p)[0]
                self.masks[n] = unpack_rows(self.loaded["packed_full"][n], p.shape)[sl].clone()
                say(f"INFO resume {n}: mask via gathered meta (B) == this rank's shard: "
                    f"{torch.equal(self.masks[n], full_mask(p.shape)[sl])}")
            return
        templates = {}
        for n, p in self.weights(pl_module).items():
            cols = -(-math.prod(p.shape[1:]) // 8)
            local = torch.zeros(shard_slice(p)[1][0], cols, dtype=torch.uint8)
            templates[KEY + n] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                                    shape=(p.shape[0], cols), stride=(cols, 1))
        dcp.load({"state_dict": templates}, checkpoint_id=trainer.ckpt_path)  # only the keys asked for
        for n, p in self.weights(pl_module).items():
            sl = shard_slice(p)[0]
            a = unpack_rows(templates[KEY + n].to_local(), shard_slice(p)[1])
            b = unpack_rows(self.loaded["packed_full"][n], p.shape)[sl]
            self.masks[n] = a
            say(f"INFO resume {n}: mask via DCP (A) == this rank's shard: {torch.equal(a, full_mask(p.shape)[sl])}; "
                f"via gathered meta.pt (B): {torch.equal(b, full_mask(p.shape)[sl])}")


def trainer(steps, cb):
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not FULL)
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                      max_steps=steps, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


if __name__ == "__main__":
    torch.manual_seed(0)
    t1 = trainer(3, Probe())
    t1.fit(Net())
    t1.save_checkpoint(CKPT)
    if t1.global_rank == 0 and FULL:
        ck = torch.load(CKPT, weights_only=True)
        say(f"INFO checkpoint {CKPT} is a file; keys {sorted(ck)}; callbacks: { {k: sorted(v) for k, v in ck['callbacks'].items()} }")
    elif t1.global_rank == 0:
        say(f"INFO checkpoint {CKPT} is a {'folder' if os.path.isdir(CKPT) else 'file'}: {sorted(os.listdir(CKPT))}")
        keys = sorted(dcp.FileSystemReader(CKPT).read_metadata().state_dict_metadata)
        say(f"INFO DCP keys: {keys}")
        meta = torch.load(os.path.join(CKPT, "meta.pt"), weights_only=True)
        say(f"INFO meta.pt keys {sorted(meta)}; callbacks entry: { {k: sorted(v) for k, v in meta['callbacks'].items()} }")
    t1.strategy.barrier()
    torch.manual_seed(1)
    t2 = trainer(5, Probe(resume=True))
    t2.fit(Net(), ckpt_path=CKPT)
    say(f"INFO resumed fit ended at global_step {t2.global_step}")
    t2.strategy.barrier()
    if t2.global_rank == 0:
        os.remove(CKPT) if FULL else shutil.rmtree(CKPT, ignore_errors=True)
