"""Plain-torch building blocks: targets, masks, budgets, schedules and reports. No Lightning here."""

from sparsetrain.core.budgets import DISTRIBUTIONS, budget_masks, layer_counts, layer_densities
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import (
    Masks,
    apply_masks_,
    global_topk_masks,
    magnitude_scores,
    random_scores,
    reset_optimizer_state_,
    topk_masks,
)
from sparsetrain.core.layouts import Layout, target_layouts
from sparsetrain.core.nm import NMStructure
from sparsetrain.core.report import SparsityReport, sparsity_report
from sparsetrain.core.schedules import cosine_decay, is_update_step, resolve_step, scheduled_sparsity
from sparsetrain.core.targets import select_targets

__all__ = [
    "DISTRIBUTIONS",
    "Layout",
    "Masks",
    "NMStructure",
    "SparsityConfigError",
    "SparsityReport",
    "apply_masks_",
    "cosine_decay",
    "global_topk_masks",
    "is_update_step",
    "layer_counts",
    "layer_densities",
    "magnitude_scores",
    "budget_masks",
    "random_scores",
    "reset_optimizer_state_",
    "resolve_step",
    "scheduled_sparsity",
    "select_targets",
    "sparsity_report",
    "target_layouts",
    "topk_masks",
]
