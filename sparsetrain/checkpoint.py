"""The checkpoint format of sparsetrain, in one place.

A sparse run's state (:meth:`SparsityEngine.state_dict <sparsetrain.engine.SparsityEngine.state_dict>`) is a dict
of plain values and CPU tensors. It is the ``SparsityCallback`` entry of a Lightning checkpoint's ``callbacks``
(under the callback's ``state_key``), what ``torch.save(engine.state_dict())`` writes in a plain loop, and the
``sparsetrain.pt`` file next to a Hugging Face Trainer checkpoint:

=================  =====================================================================================
``format``         :data:`FORMAT` (absent: written by sparsetrain 0.1 or 0.2, which this module reads too)
``targets``        target names in order (empty: the run had not started when it was saved)
``masks``          ``{name: bool tensor}`` shaped like the weight, or ``None`` (no masks yet, or sharded)
``sharded``        the masks are pieces of FSDP2-sharded targets, saved apart (below)
``packed_masks``   sharded masks gathered into a single-file checkpoint: rows bit-packed (``pack_rows``)
``method_name``    the method's class name; ``method``: its own state; ``config``: its arguments and the
                   target selection as plain values (what a resume must share)
``generator``      the state of the run's ``torch.Generator``; ``seed``: its seed; ``step``: optimizer steps
``final``          whether the weights were at the method's final sparsity with hard masks when saved
``soft``           whether the masks were soft when saved (annealing, SR-STE: the weights stay dense); absent
                   before 0.3
``sparsity``       the sparsity counted in the weights when saved
=================  =====================================================================================

In a distributed checkpoint (a folder written by ``ModelParallelStrategy``) every rank's masks are written next
to its weight shards, bit-packed by rows, as ``DTensor`` entries of ``checkpoint["state_dict"]`` named
``MASK_PREFIX + "<state_key>.<target>"``; Lightning's model load ignores them and the callback reads them back.
:func:`consolidate_checkpoint` turns such a folder into one ordinary file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks
from sparsetrain.core.bits import pack_rows, unpack_rows
from sparsetrain.core.shards import Shards, local

FORMAT = 2  # 1: sparsetrain 0.1/0.2 (no "format" key)
MASK_PREFIX = "_sparsetrain."  # keys of the sharded masks in a distributed checkpoint's state_dict
STATE_NAME = "SparsityCallback"  # callback state keys start with it (one per callback: its state_key)


def started(state: Mapping) -> bool:
    """Whether the state was saved by a run that had chosen its targets (a Lightning tuner saves the callback's
    state before the fit starts and restores it afterwards: such a state holds nothing to resume)."""
    return bool(state.get("targets"))


# ------------------------------------------------------------------ run configuration
_NOT_PLAIN = object()


def plain(value):
    """``value`` as plain Python (numbers, strings, lists, dicts), or ``_NOT_PLAIN`` (tensors, objects)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, dict):
        items = {str(k): plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN


def plain_config(config: Mapping) -> dict:
    """The entries of ``config`` that are plain values, as plain values."""
    return {k: plain(v) for k, v in config.items() if plain(v) is not _NOT_PLAIN}


def config_changes(saved: Mapping, now: Mapping, method_name: str, defaults: Mapping) -> list[str]:
    """``"key: was a, now b"`` for every entry that differs. A checkpoint without a config (before 0.2) has
    nothing to compare; an argument newer than the checkpoint is compared with its default (what it ran with)."""
    if not saved:
        return []
    saved = {**{f"{method_name}.{k}": plain(v) for k, v in defaults.items() if f"{method_name}.{k}" in now}, **saved}
    return [f"{k}: was {saved.get(k)!r}, now {now.get(k)!r}" for k in {**saved, **now} if saved.get(k) != now.get(k)]


# ---------------------------------------------------------------------------- masks
def masks_for_state(masks: Masks | None) -> dict[str, Tensor] | None:
    return None if masks is None else {n: m.detach().cpu() for n, m in masks.items()}


def mask_key(state_key: str, name: str) -> str:
    return f"{MASK_PREFIX}{state_key}.{name}"


def _packed_dtensor(target, packed_local: Tensor):
    """The bit-packed rows of this rank as a ``DTensor`` laid out like ``target``'s dim-0 shards."""
    from torch.distributed.tensor import DTensor

    width = packed_local.shape[1]
    shape = (target.shape[0] if target.dim() else 1, width)
    return DTensor.from_local(packed_local, target.device_mesh, target.placements, run_check=False, shape=shape, stride=(width, 1))


def gather_packed(targets: Mapping, masks: Masks) -> dict[str, Tensor]:
    """The whole masks of sharded targets, bit-packed by rows, on the CPU of every rank (a collective: every rank
    calls it): what a single file holds (``packed_masks``)."""
    return {n: _packed_dtensor(targets[n], pack_rows(m)).full_tensor().cpu() for n, m in masks.items()}


def save_sharded_masks(checkpoint: dict, state_key: str, targets: Mapping, masks: Masks, distributed: bool) -> None:
    """Put this rank's masks of sharded targets into a Lightning ``checkpoint`` dict: as DTensor pieces of its
    ``state_dict`` (``distributed``: a folder, each rank writes its own), or gathered into the callback's state
    (a single file written by rank 0; every rank takes part in the gather). 1 bit per weight either way."""
    if distributed:
        pieces = {n: _packed_dtensor(targets[n], pack_rows(m)) for n, m in masks.items()}
        checkpoint["state_dict"].update({mask_key(state_key, n): d for n, d in pieces.items()})
    else:
        checkpoint["callbacks"][state_key]["packed_masks"] = gather_packed(targets, masks)


def read_masks(state: Mapping, targets: Mapping, shards: Shards | None, ckpt_path=None, state_key: str = "") -> Masks | None:
    """The state's masks as this process holds them (this rank's rows of sharded targets), or ``None``."""
    if state.get("sharded") and state.get("packed_masks") is None:  # pieces in the distributed checkpoint folder
        import torch.distributed.checkpoint as dcp

        templates = {
            mask_key(state_key, n): _packed_dtensor(p, pack_rows(torch.zeros_like(local(p), dtype=torch.bool)))
            for n, p in targets.items()
        }
        dcp.load({"state_dict": templates}, checkpoint_id=ckpt_path)
        return {n: unpack_rows(templates[mask_key(state_key, n)].to_local(), tuple(local(p).shape)) for n, p in targets.items()}
    masks = state["masks"]
    if state.get("packed_masks") is not None:
        masks = {n: unpack_rows(b, tuple(targets[n].shape)) for n, b in state["packed_masks"].items()}
    if masks is not None and shards is not None:  # whole masks: keep this rank's rows
        masks = {n: m[shards.pieces[n].start : shards.pieces[n].stop] for n, m in masks.items()}
    return masks


# ------------------------------------------------------------------ reading checkpoints
def sparsity_states(checkpoint: Mapping) -> list[Mapping]:
    """The sparsetrain states in a Lightning checkpoint dict (one per ``SparsityCallback``)."""
    states = checkpoint.get("callbacks") or {}
    return [s for k, s in states.items() if str(k).startswith(STATE_NAME) and isinstance(s, Mapping)]


def read_state(path: str | Path, key: str) -> Mapping | None:
    """The state under ``key`` in a Lightning checkpoint file, read memory-mapped (the weights are not loaded);
    ``None`` when the file is a distributed checkpoint folder or holds no such state."""
    if not Path(path).is_file():
        return None
    state = (torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("callbacks") or {}).get(key)
    return state if isinstance(state, Mapping) else None


def load_masks(source: Mapping[str, Tensor] | str | Path) -> Masks:
    """Masks from a dict, a ``torch.save``\\ d ``{name: mask}`` file or a checkpoint holding masks.

    A checkpoint is a Lightning checkpoint whose ``callbacks`` hold a ``SparsityCallback`` state
    with masks (any sparsetrain run), or a dict with a ``masks`` entry (an engine's ``state_dict``). Files
    are read with ``torch.load(weights_only=True)``.
    """
    where = "the given dict"
    if isinstance(source, (str, Path)):
        where = str(source)
        if not Path(source).is_file():
            raise SparsityConfigError(f"masks={where!r}: no such file (expected a checkpoint or a masks file)")
        source = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(source, Mapping) and "callbacks" in source:
        found = [s["masks"] for s in sparsity_states(source) if s.get("masks") is not None]
        if not found:
            raise SparsityConfigError(
                f"masks={where!r} is a Lightning checkpoint without sparsity masks (no SparsityCallback state with "
                "masks): take the checkpoint of a sparse run, or use target='magnitude' to choose the subnetwork by |w|"
            )
        source = found[0]
    elif isinstance(source, Mapping) and "masks" in source:
        source = source["masks"]
    if not isinstance(source, Mapping) or not all(isinstance(m, Tensor) for m in source.values()):
        raise SparsityConfigError(f"masks={where!r} holds no {{name: mask tensor}} dict")
    return {n: m.detach().to("cpu", torch.bool) for n, m in source.items()}


def without_sparsity(checkpoint: dict) -> dict:
    """The checkpoint without any callback state (a lottery rewind point: every level brings its own masks)."""
    checkpoint["callbacks"] = {}
    return checkpoint


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
            state["masks"] = {n: unpack_rows(weights.pop(mask_key(state_key, n)), tuple(weights[n].shape)) for n in state["targets"]}
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
