"""``sparsetrain-lottery``: lottery tickets by iterative magnitude pruning (IMP) with rewinding, from Hydra configs.

The algorithm, its variants (``lottery.mode=lr``), controls (``lottery.control=reinit|random_mask``), output folders
and resume rules are those of :class:`sparsetrain.lottery.Lottery`, which this app builds from the composed config
(data, model, module, trainer, logger groups) and runs level by level, one log line each, then the level table.

    sparsetrain-lottery experiment=lth_lenet_digits          # minutes on CPU
    sparsetrain-lottery experiment=lth_lenet_digits lottery.control=reinit
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
