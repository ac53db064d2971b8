"""Hydra helpers shared by ``sparsetrain-train`` and ``sparsetrain-lottery`` (the conventions of
ashleve/lightning-hydra-template): callbacks and loggers from their config groups, the resolved
config as every logger's hyperparameters, the W&B group of a sweep, the command-line overrides."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

WANDB_GROUP_MAX = 128  # W&B refuses longer group names


def _nodes(cfg: DictConfig | Mapping | None, group: str):
    """``(name, node)`` for each entry of a ``callbacks`` / ``logger`` group; ``null`` entries are skipped."""
    if not cfg:
        return
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise TypeError(f"`{group}` must be a mapping of name -> node with _target_, got {type(cfg).__name__}")
    for name, node in cfg.items():
        if node is None:  # `callbacks.model_checkpoint=null` switches one off
            continue
        if not isinstance(node, (DictConfig, Mapping)) or "_target_" not in node:
            raise ValueError(
                f"{group}.{name} has no _target_: each entry of `{group}` is a node like "
                f"+{group}.{name}._target_=<class path> (or null to leave it out)"
            )
        yield name, node


def instantiate_callbacks(cfg: DictConfig | None) -> list:
    """The callbacks of a ``callbacks`` config group (``{name: node}``), in order."""
    return [instantiate(node) for _, node in _nodes(cfg, "callbacks")]


def instantiate_loggers(cfg: DictConfig | None) -> list:
    """The loggers of a ``logger`` config group (``{name: node}``), in order."""
    return [instantiate(node) for _, node in _nodes(cfg, "logger")]


# ------------------------------------------------------------------------------ Hydra run info
def hydra_config():
    """``HydraConfig.get()`` inside a Hydra app, else ``None`` (e.g. ``compose`` in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of this job (``hydra.overrides.task``), ``None`` outside a Hydra app."""
    hc = hydra_config()
    return None if hc is None else list(hc.overrides.task)


def sweep_group(hc=None) -> str | None:
    """In a multirun, the sweep folder (relative to the working directory when inside it), e.g.
    ``multirun/2025-01-31/12-00-00``; ``None`` for a single run or outside Hydra."""
    from hydra.types import RunMode

    hc = hydra_config() if hc is None else hc
    if hc is None or hc.mode != RunMode.MULTIRUN or not hc.sweep.dir:
        return None
    sweep, cwd = Path(os.path.abspath(hc.sweep.dir)), Path(os.path.abspath(hc.runtime.cwd or os.getcwd()))
    group = str(sweep.relative_to(cwd)) if sweep.is_relative_to(cwd) else str(sweep)
    return group[-WANDB_GROUP_MAX:]


def set_wandb_group(logger_cfg: DictConfig | None, group: str | None = None) -> str | None:
    """Set ``group`` of every WandbLogger node that has none (null or "") to the sweep folder
    (:func:`sweep_group`), so the jobs of one sweep form one W&B group. Returns the group set."""
    group = sweep_group() if group is None else group
    if not group or not logger_cfg:
        return None
    done = None
    for _, node in _nodes(logger_cfg, "logger"):
        if str(node["_target_"]).endswith("WandbLogger") and not node.get("group"):
            with open_dict(node):
                node.group = group
            done = group
    return done


# ------------------------------------------------------------------------- hyperparameters
def plain(value: Any) -> Any:
    """JSON-able copy: tuples -> lists, anything else unknown -> ``str``."""
    return json.loads(json.dumps(value, default=str))


def method_info(method) -> dict | None:
    """``{"name": "GMP", "args": {...}}``: the sparsity method's class and constructor arguments."""
    if method is None:
        return None
    args = method.hparams() if callable(getattr(method, "hparams", None)) else {}
    return {"name": type(method).__name__, "args": plain(args)}


def experiment_hparams(cfg: DictConfig, method=None, overrides: list[str] | None = None) -> dict:
    """The whole resolved config (``seed``, ``data``, ``model``, ``module``, ``sparsity``, ``trainer``,
    ``callbacks``, ...), plus ``method`` (:func:`method_info`) and the command-line ``overrides``."""
    hparams = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    hparams = plain(hparams)
    if method is not None:
        hparams["method"] = method_info(method)
    if overrides is not None:
        hparams["overrides"] = list(overrides)
    return hparams


def log_hyperparameters(trainer, hparams: Mapping) -> None:
    """``logger.log_hyperparams(hparams)`` for every logger of ``trainer`` (CSV / TensorBoard:
    ``hparams.yaml``; W&B: the run's config)."""
    for logger in trainer.loggers:
        logger.log_hyperparams(dict(hparams))
