"""Layouts that sharded masks do not support fail with a message (one CPU process, a 1-rank gloo group).

Usage: ``python tests/shard_layouts.py``: prints one line per case, ``<case>: <error message>``."""

import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.core.errors import SparsityConfigError  # noqa: E402
from sparsetrain.core.shards import Shards  # noqa: E402

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
w = torch.randn(6, 8)
cases = {
    "replicate": {"fc.weight": distribute_tensor(w, mesh, [Replicate()])},
    "shard_dim1": {"fc.weight": distribute_tensor(w, mesh, [Shard(1)])},
    "mixed": {"fc.weight": distribute_tensor(w, mesh, [Shard(0)]), "head.weight": torch.randn(2, 6)},
}
for case, params in cases.items():
    try:
        Shards.of(params)
        print(f"{case}: accepted")
    except SparsityConfigError as err:
        print(f"{case}: {err}")
good = Shards.of({"fc.weight": distribute_tensor(w, mesh, [Shard(0)])})
print(f"shard0: {good.pieces['fc.weight']} world={good.world}")
print(f"plain: {Shards.of({'fc.weight': w})}")
dist.destroy_process_group()
