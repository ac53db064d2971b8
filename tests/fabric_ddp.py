"""Lightning Fabric with DDP on two CPU processes (gloo) and ``sparsetrain.attach``: every rank's masks and weights.

Usage: ``python tests/fabric_ddp.py OUT_DIR METHOD``. Fabric re-launches this script for rank 1; each rank trains
on its half of the data (the DistributedSampler of ``fabric.setup_dataloaders``) and writes ``OUT_DIR/rank{r}.pt``
with its masks after every step and its final weights.
"""

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsetrain  # noqa: E402
from tests.helpers import TinyNet, random_loader  # noqa: E402

METHODS = {
    "rigl": dict(method="rigl", sparsity=0.8, every=2, end=14, distribution="uniform"),
    "gmp": dict(method="gmp", sparsity=0.8, start=1, end=10, every=3, distribution="global"),
    # the linear layers on sparse kernels (the convolution is not a target: compute="sparse" cannot take it)
    "rigl_sparse": dict(method="rigl", sparsity=0.8, every=2, end=14, distribution="uniform", compute="sparse", exclude="conv.weight"),
}

if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out, method = Path(sys.argv[1]), sys.argv[2]
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    L.seed_everything(0)
    model = TinyNet()
    model, optimizer = fabric.setup(model, model.configure_optimizers())
    loader = fabric.setup_dataloaders(random_loader(n=128, batch_size=8))
    engine = sparsetrain.attach(model, optimizer, total_steps=16, **METHODS[method])
    history = []
    for _ in range(2):
        for x, y in loader:
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            history.append({n: m.clone() for n, m in engine.masks.items()})
    engine.detach()
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    torch.save({"history": history, "weights": weights, "step": engine.step}, out / f"rank{fabric.global_rank}.pt")
