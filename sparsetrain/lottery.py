"""Lottery tickets by iterative magnitude pruning (IMP) with rewinding: :class:`Lottery`, with Lightning Trainers.

The library API (Lightning, no Hydra); ``sparsetrain-lottery`` (:mod:`sparsetrain.apps.lottery`) is the Hydra app
on top of it, and ``python -m sparsetrain.lottery`` runs that app.

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

import csv
import itertools
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from sparsetrain.callback import SparsityCallback
from sparsetrain.checkpoint import without_sparsity
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.imp import COUNTING, PRUNING, check_fraction, imp_masks, layer_fraction_map, random_masks_like
from sparsetrain.core.layouts import NM_LAYOUTS, target_layouts
from sparsetrain.core.masks import reset_optimizer_state_
from sparsetrain.core.nm import NMStructure
from sparsetrain.core.schedules import resolve_step
from sparsetrain.core.targets import TargetSelection
from sparsetrain.methods.fixed import FixedMasks

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
        fingerprint: anything else that must match when a run folder is reused. logger: where the one line per
        level goes (default: the ``sparsetrain.lottery`` logger).

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
        logger: logging.Logger | None = None,
    ):
        self.log = logger or log  # one line per level
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
        self.selection = TargetSelection(include, exclude, dense_first, dense_last)
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
                    **vars(self.selection),
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
            targets = self.selection.select(self.make_module(self.make_datamodule()))
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
                self.log.info("%s: done before (%s)", _level_line(result, self.levels), done)
            else:
                result = self._level(level, folder)
                self.log.info("%s", _level_line(result, self.levels))
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
        sparsity = SparsityCallback(FixedMasks(masks), seed=p["seed"], **vars(self.selection))
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
        targets = self.selection.select(module)
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

    try:
        accuracy_vs_density(rows, root / "accuracy_vs_density.png")
    except ImportError:  # matplotlib comes with the [apps] extra
        log.info("matplotlib is not installed: no %s", root / "accuracy_vs_density.png")
    return rows


# -------------------------------------------------------------------------- rewinding
class SaveRewindPoint(Callback):
    """Level 0: write the full training state right after optimizer step ``k`` (``k = 0``: at train start)."""

    def __init__(self, rewind, path: Path):
        self.rewind, self.path, self.step, self.saved = rewind, Path(path), None, False

    def on_fit_start(self, trainer, pl_module):
        total = trainer.estimated_stepping_batches
        self.step = resolve_step(self.rewind, total if math.isfinite(total) else None, "lottery.rewind")
        if self.step >= total:
            raise SparsityConfigError(
                f"lottery.rewind={self.rewind!r} is step {self.step}, but training has only {int(total)} optimizer "
                f"steps; allowed: an int in [0, {int(total)}) or a float fraction of training in [0, 1)"
            )

    def on_train_start(self, trainer, pl_module):
        if self.step == trainer.global_step == 0:
            self._save(trainer)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not self.saved:
            self._save(trainer)

    def _save(self, trainer):
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp)  # every rank calls it (it has a barrier); rank 0 writes
        if trainer.is_global_zero:
            ckpt = torch.load(tmp, map_location="cpu", weights_only=False)
            torch.save(without_sparsity(ckpt), tmp)  # no masks, no best-checkpoint bookkeeping: each level brings its own
            os.replace(tmp, self.path)
        self.saved = True


class LevelStart(Callback):
    """Before a level trains: load LR-rewinding weights, zero the optimizer state of pruned weights,
    and skip the batches of the current epoch that the restored checkpoint had already trained on."""

    def __init__(self, sparsity: SparsityCallback, weights: dict | None, fresh: bool, fresh_optimizer: bool = False):
        self.sparsity, self.weights, self.fresh, self.fresh_optimizer = sparsity, weights, fresh, fresh_optimizer

    def on_fit_start(self, trainer, pl_module):  # after the checkpoint's weights, before the masks are applied
        if self.weights is not None:
            pl_module.load_state_dict(self.weights)

    def on_train_start(self, trainer, pl_module):  # after the optimizer and loop state are restored
        if self.fresh_optimizer:  # OpenLTH: a new optimizer per level (LR schedule and step stay at k)
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        if self.fresh and self.sparsity.masks is not None:
            for optimizer in trainer.optimizers:
                reset_optimizer_state_(optimizer, self.sparsity.targets.values(), self.sparsity.masks.values())
        if trainer.global_step == 0 or not math.isfinite(trainer.num_training_batches):
            return
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        done = (trainer.global_step - trainer.current_epoch * per_epoch) * trainer.accumulate_grad_batches
        loader = trainer.train_dataloader
        batches = getattr(loader, "batch_sampler", None)
        if not hasattr(batches, "sampler"):
            warnings.warn(
                "cannot restore the data position of the rewind point: the train loader has no batch "
                "sampler; the resumed epoch restarts from its first batch",
                stacklevel=2,
            )
            return
        # Lightning starts the loader's iterator before it sets the sampler's epoch; with worker processes
        # they have already drawn indices, so set the epoch and restart them (the order is seed + epoch)
        if hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(trainer.current_epoch)
        batches.sampler = SkipFirst(batches.sampler, max(done, 0) * batches.batch_size)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if getattr(loader, "num_workers", 0) and fetcher is not None:
            iter(fetcher)


class SkipFirst(torch.utils.data.Sampler):
    """Wraps a sampler; its next iteration (only) skips the first ``n`` indices."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        n, self.n = self.n, 0
        return itertools.islice(iter(self.sampler), n, None)


if __name__ == "__main__":  # python -m sparsetrain.lottery: the sparsetrain-lottery app
    from sparsetrain.apps.lottery import main

    main()
