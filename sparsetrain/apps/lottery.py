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
import csv
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from sparsetrain.apps.hydra_utils import instantiate_callbacks, instantiate_loggers
from sparsetrain.apps.train import config_dir
from sparsetrain.callback import SparsityCallback
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.imp import COUNTING, PRUNING, check_fraction, imp_masks, layer_fraction_map, random_masks_like
from sparsetrain.core.nm import NMStructure
from sparsetrain.core.layouts import NM_LAYOUTS, target_layouts
from sparsetrain.core.targets import select_targets
from sparsetrain.apps.rewind import LevelStart, SaveRewindPoint
from sparsetrain.methods.fixed import FixedMasks

_LevelStart = LevelStart  # the name of 0.1

MODES, CONTROLS = ("weight", "lr"), ("none", "reinit", "random_mask")
log = logging.getLogger(__name__)
COLUMNS = ["run", "level", "target_density", "density", "test_acc", "test_acc_final", "val_acc", "steps", "wall_time_s"]


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise SparsityConfigError(f"lottery.{key}={value!r} is unknown; allowed: {', '.join(map(str, allowed))}")


class Lottery:
    """Run IMP level by level with Lightning Trainers (see the module docstring for the algorithm).

    Args:
        make_module: ``datamodule -> LightningModule`` (called after ``seed_everything``; it logs
            ``test_metric`` in ``test_step`` and ``monitor`` in ``validation_step``).
        make_datamodule: ``() -> LightningDataModule``.
        make_trainer: ``(level_dir, callbacks) -> Trainer``; pass ``callbacks`` through, in order.
        dir: run folder. levels: pruning levels after level 0. prune_fraction: ``p`` in (0, 1).
        rewind: ``k`` as int steps or float fraction of training. pruning: ``global`` | ``layerwise``.
        layer_fractions: ``{glob: p}`` per-layer fractions. mode: ``weight`` | ``lr``.
        control: ``none`` | ``reinit`` | ``random_mask``. control_seed: init seed of ``reinit`` and
        mask seed of ``random_mask`` (default ``seed + 10000``). seed: ``seed_everything`` before
        building each level's module and data. monitor: the metric (max) that picks a level's best
        checkpoint, ``None`` for none. test_metric: the key of ``trainer.test`` reported as accuracy.
        include, exclude, dense_first, dense_last: the targets, as in :class:`~sparsetrain.SparsityCallback`.
        ignore: globs on targets kept dense but counted in the remaining weights (OpenLTH's
        ``pruning_layers_to_ignore``; ``exclude``/``dense_last`` instead leave a layer out of the count).
        counting: ``closed_form`` (``round(N (1 - p)^L)``) or ``openlth`` (``ceil(p remaining) + 1`` per
        level), see :mod:`sparsetrain.core.imp`. rewind_optimizer: ``True`` restores the optimizer state of
        the rewind point; ``False`` starts every level with a fresh optimizer (OpenLTH), the LR schedule and
        step still at ``k``. structure: ``None`` or ``"N:M"``: levels that end N:M (every level keeps at least
        ``N`` of every ``M`` weights, and from the level whose density reaches ``N/M`` on exactly ``N``), with
        ``indivisible`` (``dense`` | ``unstructured`` | ``error``) for layers that cannot hold it and
        ``nm_layout`` (``channels`` | ``flat``: how a convolution's groups run, :mod:`sparsetrain.core.layouts`);
        see :mod:`sparsetrain.core.imp`.
        fingerprint: anything else that must match when a run folder is reused.

    Example (a minute on a CPU)::

        import lightning as L
        from sparsetrain.apps.data import DigitsDataModule
        from sparsetrain.apps.models import LeNet300100
        from sparsetrain.apps.module import ClassificationModule

        def make_trainer(level_dir, callbacks):  # pass the callbacks through, in order
            return L.Trainer(max_epochs=5, default_root_dir=level_dir, callbacks=callbacks, logger=False)

        results = Lottery(lambda dm: ClassificationModule(LeNet300100(img_size=8), num_classes=10), DigitsDataModule,
                          make_trainer, dir="runs/lth", levels=3, rewind=0.05).run()
    """

    def __init__(
        self,
        make_module,
        make_datamodule,
        make_trainer,
        dir,
        levels: int = 5,
        prune_fraction: float = 0.2,
        rewind: int | float = 0,
        pruning: str = "global",
        layer_fractions: dict | None = None,
        mode: str = "weight",
        control: str = "none",
        control_seed: int | None = None,
        seed: int = 0,
        monitor: str | None = "val/acc",
        test_metric: str = "test/acc",
        include=None,
        exclude=None,
        dense_first: bool = False,
        dense_last: bool = False,
        fingerprint: dict | None = None,
        ignore: list[str] | None = None,
        counting: str = "closed_form",
        rewind_optimizer: bool = True,
        structure: str | None = None,
        indivisible: str = "dense",
        nm_layout: str = "channels",
    ):
        check_fraction(prune_fraction, "lottery.prune_fraction")
        structure = None if NMStructure.parse(structure, "lottery.structure") is None else str(NMStructure.parse(structure))
        _choice("indivisible", indivisible, ("dense", "unstructured", "error"))
        _choice("nm_layout", nm_layout, NM_LAYOUTS)
        if structure is not None and counting == "openlth":
            raise SparsityConfigError("lottery.counting=openlth has no N:M structure: use lottery.counting=closed_form with lottery.structure")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise SparsityConfigError(
                f"lottery.levels={levels!r} must be an int >= 1 (pruning levels after the dense level 0)"
            )
        if (
            isinstance(rewind, bool)
            or not isinstance(rewind, (int, float))
            or rewind < 0
            or (isinstance(rewind, float) and rewind >= 1)
        ):
            raise SparsityConfigError(
                f"lottery.rewind={rewind!r} must be an int >= 0 (optimizer steps) or a float in [0, 1) (fraction of training)"
            )
        _choice("pruning", pruning, PRUNING), _choice("mode", mode, MODES), _choice("control", control, CONTROLS)
        _choice("counting", counting, COUNTING), _choice("rewind_optimizer", rewind_optimizer, (True, False))
        if counting == "openlth" and (pruning != "global" or layer_fractions):
            raise SparsityConfigError("lottery.counting=openlth is OpenLTH's sparse_global: use lottery.pruning=global without layer_fractions")
        # reference conventions enter the folder's fingerprint only when used (older folders stay valid)
        reference = dict(
            ignore=list(ignore or []), counting=counting, rewind_optimizer=rewind_optimizer, structure=structure,
            indivisible=indivisible, nm_layout=nm_layout if structure is not None else None,  # with a structure, always
        )
        defaults = dict(ignore=[], counting="closed_form", rewind_optimizer=True, structure=None, indivisible="dense", nm_layout=None)
        reference = {k: v for k, v in reference.items() if v != defaults[k]}
        self.make_module, self.make_datamodule, self.make_trainer = make_module, make_datamodule, make_trainer
        self.root = Path(dir)
        self.out = self.root if control == "none" else self.root / f"control_{control}"
        self.levels, self.control, self.monitor, self.test_metric = levels, control, monitor, test_metric
        self.control_seed = seed + 10000 if control_seed is None else control_seed
        self.targets_args = dict(include=include, exclude=exclude, dense_first=dense_first, dense_last=dense_last)
        self.params = json.loads(
            json.dumps(
                dict(
                    prune_fraction=prune_fraction,
                    rewind=rewind,
                    pruning=pruning,
                    layer_fractions=dict(layer_fractions or {}),
                    mode=mode,
                    seed=seed,
                    control_seed=self.control_seed if control != "none" else None,
                    monitor=monitor,
                    **self.targets_args,
                    **reference,
                    **_flat(fingerprint or {}),
                )
            )
        )

    # ------------------------------------------------------------------ levels
    def run(self) -> list[dict]:
        """Train every level not yet done; return one result dict per level (also in ``result.json``)."""
        fresh = not self.out.exists()
        self._check_folder()
        if self.params["layer_fractions"]:  # a glob that matches no target fails now, not after level 0
            targets = select_targets(self.make_module(self.make_datamodule()), **self.targets_args)
            layer_fraction_map(list(targets), self.params["layer_fractions"], "lottery.layer_fractions")
        if _rank0():  # claim the folder only once the settings are known to work
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "lottery.json").write_text(json.dumps(self.params, indent=2))
        try:
            return self._levels()
        except SparsityConfigError:  # rejected at a level's fit start: a new folder with no level done is not kept
            if fresh and _rank0() and not any(self.out.glob("level_*/result.json")):
                shutil.rmtree(self.out, ignore_errors=True)
            raise

    def _levels(self) -> list[dict]:
        results = []
        for level in range(0 if self.control == "none" else 1, self.levels + 1):
            folder = self.out / f"level_{level:02d}"
            done = folder / "result.json"
            if done.is_file():
                result = json.loads(done.read_text())
                log.info("%s: done before (%s)", _level_line(result, self.levels), done)
            else:
                result = self._level(level, folder)
                log.info("%s", _level_line(result, self.levels))
            results.append(result)
            if _rank0():
                write_summary(self.root)
        return results

    def _level(self, level: int, folder: Path) -> dict:
        started, p = time.perf_counter(), self.params
        pl.seed_everything(self.control_seed if self.control == "reinit" else p["seed"], workers=True)
        datamodule = self.make_datamodule()
        module = self.make_module(datamodule)
        rewind, last = self.root / "rewind.ckpt", folder / "checkpoints" / "last.ckpt"
        masks = weights = ckpt = None
        if last.is_file() and (level > 0 or rewind.is_file()):  # half-finished level: continue it
            ckpt = last
        else:
            masks = self._masks(level, module)
            if _rank0():  # under DDP every rank runs this script; rank 0 alone writes files
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                torch.save(masks, folder / "masks.pt")
            ckpt = None if level == 0 or self.control == "reinit" else rewind
            if p["mode"] == "lr" and level > 0 and self.control == "none":
                weights = _state(self.out / f"level_{level - 1:02d}")
        sparsity = SparsityCallback(FixedMasks(masks), seed=p["seed"], **self.targets_args)
        fresh_optimizer = masks is not None and level > 0 and not p.get("rewind_optimizer", True)
        best = ModelCheckpoint(
            folder / "checkpoints",
            filename="best",
            monitor=self.monitor,
            mode="max",
            save_last=True,
            save_top_k=1 if self.monitor else 0,
        )
        callbacks = [LevelStart(sparsity, weights, fresh=masks is not None, fresh_optimizer=fresh_optimizer), sparsity, best]
        if level == 0:
            callbacks.append(SaveRewindPoint(p["rewind"], rewind))
        trainer = self.make_trainer(folder, callbacks)
        with warnings.catch_warnings():  # _LevelStart restores the data position that this warns about
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)  # our own files
        report = sparsity.sparsity_report()
        trainer.save_checkpoint(folder / "final.ckpt", weights_only=True)  # rewinding needs no optimizer state
        final = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        tested = (
            trainer.test(
                module, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False, weights_only=False
            )[0]
            if best.best_model_path
            else final
        )
        result = dict(
            run=p["mode"] if self.control == "none" else self.control,
            level=level,
            target_density=(1 - p["prune_fraction"]) ** level,
            density=1 - report.global_sparsity,
            test_acc=tested.get(self.test_metric),
            test_acc_final=final.get(self.test_metric),
            val_acc=None if best.best_model_score is None else float(best.best_model_score),
            steps=trainer.global_step,
            wall_time_s=round(time.perf_counter() - started, 2),
            nonzero=report.numel - report.zeros,
            prunable=report.numel,
            test=final,
            test_best=tested,
        )
        if _rank0():
            (folder / "sparsity.json").write_text(json.dumps(report.to_dict(), indent=2))
            (folder / "sparsity.txt").write_text(report.table() + "\n")
            last.unlink(missing_ok=True)  # final.ckpt holds the same state
            (folder / "result.json").write_text(json.dumps(result, indent=2))
        return result

    def _masks(self, level: int, module) -> dict:
        targets = select_targets(module, **self.targets_args)
        if level == 0:
            return {n: torch.ones(t.shape, dtype=torch.bool) for n, t in targets.items()}
        main = self.root / f"level_{level:02d}" / "masks.pt"
        if self.control != "none":
            if not main.is_file():
                raise SparsityConfigError(
                    f"lottery.control={self.control} needs the masks of the main run in {main}: run the same command "
                    f"without lottery.control (with lottery.levels >= {level}) first"
                )
            masks = torch.load(main, weights_only=True)
            return (
                masks
                if self.control == "reinit"
                else random_masks_like(masks, torch.Generator().manual_seed(self.control_seed + level))
            )
        prev = self.out / f"level_{level - 1:02d}"
        state = _state(prev)
        return imp_masks(
            {n: state[n] for n in targets},
            torch.load(prev / "masks.pt", weights_only=True),
            level,
            self.params["prune_fraction"],
            self.params["pruning"],
            self.params["layer_fractions"],
            self.params.get("ignore"),
            self.params.get("counting", "closed_form"),
            self.params.get("structure"),
            self.params.get("indivisible", "dense"),
            target_layouts(module, targets),
            self.params.get("nm_layout") or "channels",
        )

    def _check_folder(self) -> None:
        """The settings must match those the folder was made with (a control's: those of the main run too)."""
        for saved in dict.fromkeys([self.root / "lottery.json", self.out / "lottery.json"]):
            old = json.loads(saved.read_text()) if saved.is_file() else self.params
            if old.get("structure") and "nm_layout" not in old:  # folders from before nm_layout grouped convs flat
                old = {**old, "nm_layout": "flat"}
            keys = (set(old) | set(self.params)) - ({"control_seed"} if saved.parent != self.out else set())
            diff = [k for k in sorted(keys) if old.get(k) != self.params.get(k)]
            if diff:
                raise SparsityConfigError(
                    f"{saved.parent} holds a lottery run made with different settings: "
                    + "; ".join(f"{k}: was {old.get(k)!r}, now {self.params.get(k)!r}" for k in diff)
                    + ". Use another lottery.dir (or lottery.name), or delete the folder to start over"
                )


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, so a changed setting is named by its full key."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _rank0() -> bool:
    return rank_zero_only.rank == 0


def _state(folder: Path) -> dict:
    return torch.load(folder / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]


# -------------------------------------------------------------------------- summary
def _level_line(r: dict, levels: int) -> str:
    """One line per level for the log: ``weight level 03/18: density 51.20 % ...``."""
    acc = lambda x: "n/a" if x is None else f"{100 * x:.2f} %"  # noqa: E731
    return (
        f"{r.get('run')} level {r.get('level', 0):02d}/{levels:02d}: density {acc(r.get('density'))}, "
        f"test_acc {acc(r.get('test_acc'))} (best val ckpt), {acc(r.get('test_acc_final'))} (final), "
        f"{r.get('steps')} steps, {r.get('wall_time_s')} s"
    )


def write_summary(root: Path) -> list[dict]:
    """``summary.csv``, ``summary.md`` and ``accuracy_vs_density.png`` over the main run and its controls."""
    root = Path(root)
    files = sorted(root.glob("level_*/result.json")) + sorted(root.glob("control_*/level_*/result.json"))
    rows = [{k: json.loads(f.read_text()).get(k) for k in COLUMNS} for f in files]
    with open(root / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    fmt = {
        "target_density": "{:.4f}",
        "density": "{:.4f}",
        "test_acc": "{:.4f}",
        "test_acc_final": "{:.4f}",
        "val_acc": "{:.4f}",
    }
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [
        "| " + " | ".join("" if r[k] is None else fmt.get(k, "{}").format(r[k]) for k in COLUMNS) + " |" for r in rows
    ]
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    from sparsetrain.plot import accuracy_vs_density

    accuracy_vs_density(rows, root / "accuracy_vs_density.png")
    return rows


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
        make_module, lambda: instantiate(cfg.data), make_trainer, seed=cfg.seed, fingerprint=fingerprint, **options
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
