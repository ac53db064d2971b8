"""``sparsetrain-lottery``: lottery tickets by iterative magnitude pruning (IMP) with rewinding.

Algorithm (Frankle & Carbin 2019; Frankle et al. 2020 "Linear Mode Connectivity and the LTH"):

* level 0 trains dense and stores the *rewind point* ``rewind.ckpt``: the full training state
  (weights, optimizer state, LR schedule, step counter, data position) right after optimizer
  step ``k`` (``rewind``: int steps or float fraction of training; ``k = 0`` is the initial
  state, before any step).
* level ``L >= 1`` keeps the ``round(N (1 - p)^L)`` largest ``|w|`` of level ``L - 1``'s
  final weights among its survivors (``global`` or ``layerwise``, see
  :mod:`sparsetrain.core.imp`), resumes from ``rewind.ckpt``, zeroes the pruned weights and
  their optimizer state, and trains from step ``k`` to the end with the masks held fixed
  (:class:`~sparsetrain.methods.FixedMasks`).

Variants: ``mode="lr"`` is learning-rate rewinding (Renda et al. 2020): as above, but the
weights are level ``L - 1``'s final weights, so only the step, LR schedule, optimizer state and
data position go back to ``k``. Controls (run after the main run, in ``<dir>/control_<name>/``):
``reinit`` trains each level's masks from a fresh init (``control_seed``, default ``seed +
10000``) from step 0; ``random_mask`` draws random masks with each level's per-layer counts and
rewinds them like weight rewinding.

Output: ``<dir>/rewind.ckpt``, ``<dir>/level_LL/`` with ``masks.pt``, ``final.ckpt``,
``checkpoints/best*.ckpt``, ``csv/metrics.csv``, ``sparsity.json``, ``sparsity.txt`` and
``result.json`` (written last: a level is done when it exists); ``<dir>/summary.csv``,
``summary.md``, ``accuracy_vs_density.png`` over the main run and every control. "test_acc" is
the test accuracy of the best-``monitor`` (val/acc) checkpoint, "test_acc_final" that of the
final weights. Resume: the same command skips done levels; a started level resumes from its
``checkpoints/last.ckpt`` (end of its last epoch), else restarts from the rewind point.

    sparsetrain-lottery experiment=lth_lenet_digits          # minutes on CPU
    sparsetrain-lottery experiment=lth_lenet_digits lottery.control=reinit

In Python, ``Lottery(make_module, make_datamodule, make_trainer, dir, levels=...).run()``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sparsetrain.apps.hydra_utils import instantiate_callbacks, instantiate_loggers
from sparsetrain.apps.train import config_dir
from sparsetrain.lottery import COLUMNS, CONTROLS, MODES, LevelStart, Lottery, _rank0, write_summary  # noqa: F401

_LevelStart = LevelStart  # the name of 0.1
log = logging.getLogger("sparsetrain.apps.lottery")


# --------------------------------------------------------------------------- Hydra
def lottery_from_config(cfg: DictConfig) -> Lottery:
    """A :class:`Lottery` from the composed ``lottery`` config (data, model, module, trainer, logger groups)."""

    def make_module(datamodule):
        shape = {k: getattr(datamodule, k) for k in ("num_classes", "in_chans", "img_size") if cfg.model.get(k) is None}
        return instantiate(cfg.module, net=instantiate(cfg.model, **shape), num_classes=datamodule.num_classes)

    built = []  # trainers made so far: verbose=false shows the model summary of the first one only

    def make_trainer(folder: Path, callbacks: list):
        level_cfg = copy.deepcopy(cfg)
        level_cfg.paths.output_dir = str(folder)
        loggers = instantiate_loggers(level_cfg.get("logger"))
        callbacks = callbacks + instantiate_callbacks(level_cfg.get("callbacks"))  # the level's own first, in order
        quiet = {"enable_model_summary": False} if built and not cfg.get("verbose", True) else {}
        built.append(folder)
        return instantiate(level_cfg.trainer, callbacks=callbacks, logger=loggers or False, **quiet)

    options = OmegaConf.to_container(cfg.lottery, resolve=True)
    options.pop("name", None)
    keys = ("max_epochs", "max_steps", "accumulate_grad_batches", "limit_train_batches")
    fingerprint = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "module": OmegaConf.to_container(cfg.module, resolve=True),
        "data": {k: cfg.data.get(k) for k in ("_target_", "name", "batch_size", "seed")},
        "trainer": {k: cfg.trainer.get(k) for k in keys},
    }
    return Lottery(
        make_module, lambda: instantiate(cfg.data), make_trainer, seed=cfg.seed, fingerprint=fingerprint, logger=log, **options
    )


# Lightning's per-fit INFO messages ("GPU available", "Seed set to", "Restoring states", "`Trainer.fit` stopped", ...)
LIGHTNING_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda")  # fmt: skip


@contextlib.contextmanager
def _quiet_lightning(quiet: bool = True):
    """Lightning's per-fit INFO messages to WARNING while the levels run (warnings and errors still show)."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO] if quiet else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_lottery(cfg: DictConfig) -> list[dict]:
    """What ``sparsetrain-lottery`` does: every level of ``cfg`` (one INFO line each; Lightning's per-fit
    messages only with ``verbose=true``), then the level table of ``summary.md`` at INFO."""
    lottery = lottery_from_config(cfg)
    with _quiet_lightning(not cfg.get("verbose", False)):
        results = lottery.run()
    table = lottery.root / "summary.md"
    if _rank0() and table.is_file():
        log.info("lottery %s (%s):\n%s", lottery.root, "summary.md, summary.csv, accuracy_vs_density.png",
                 table.read_text().rstrip())  # fmt: skip
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="lottery")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the last level's test accuracy."""
    return run_lottery(cfg)[-1]["test_acc"]


if __name__ == "__main__":
    main()
