"""Sharded checkpoints of ``SparsityCallback`` (FSDP2, ``ModelParallelStrategy``), and their consolidation.

In a distributed checkpoint (a folder) every rank's masks are written next to its weight shards, bit-packed by
rows (:func:`sparsetrain.core.shards.pack_rows`), as ``DTensor`` entries of ``checkpoint["state_dict"]`` named
``MASK_PREFIX + "<state_key>.<target>"``; Lightning's model load ignores them and the callback reads them back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsetrain.core.shards import unpack_rows

MASK_PREFIX = "_sparsetrain."  # keys of the sharded masks in a distributed checkpoint's state_dict
def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """One Lightning checkpoint file from a distributed (sharded) checkpoint folder, masks included.

    ``folder``: what ``ModelParallelStrategy`` wrote (``save_distributed_checkpoint=True``). The file holds the
    full weights, every ``SparsityCallback``'s whole masks in its state (as a single-device run writes them),
    and the optimizer states keyed by parameter index, so a single-device or DDP ``Trainer`` resumes from it
    (``trainer.fit(model, ckpt_path=output)``), and ``trainer.test``/``LightningModule.load_from_checkpoint``
    load it. Reads the whole checkpoint into CPU memory (as ``lightning.pytorch.utilities.consolidate_checkpoint``).
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(Path(folder))
    weights = checkpoint["state_dict"]
    for state_key, state in checkpoint.get("callbacks", {}).items():
        if isinstance(state, dict) and state.get("sharded"):
            keys = {n: f"{MASK_PREFIX}{state_key}.{n}" for n in state["targets"]}
            state["masks"] = {n: unpack_rows(weights.pop(k), tuple(weights[n].shape)) for n, k in keys.items()}
            state["sharded"] = False
    names = sorted((k for k in checkpoint if k.startswith("optimizer_") and k[10:].isdigit()), key=lambda k: int(k[10:]))
    if names:  # torch.distributed.checkpoint keys optimizer state by parameter name; torch.optim by index
        checkpoint["optimizer_states"] = []
        for name in names:
            optimizer = checkpoint.pop(name)
            order = {fqn: i for i, fqn in enumerate(p for g in optimizer["param_groups"] for p in g["params"])}
            optimizer["state"] = {order[fqn]: v for fqn, v in optimizer["state"].items()}
            for group in optimizer["param_groups"]:
                group["params"] = [order[fqn] for fqn in group["params"]]
            checkpoint["optimizer_states"].append(optimizer)
    torch.save(checkpoint, output)
    return Path(output)
