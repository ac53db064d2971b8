"""``sparsetrain-train``: train a classifier sparse, configured with Hydra.

    sparsetrain-train                                        # GMP to 90 % on digits, CPU, ~1 min
    sparsetrain-train model=resnet20 data=cifar10 trainer=gpu sparsity.method.sparsity=0.95
    sparsetrain-train -m sparsity=dense,static,gmp seed=0,1  # sweep
    sparsetrain-train ckpt_path=outputs/<run>/checkpoints/last.ckpt   # resume
    sparsetrain-train hydra.run.dir=outputs/<run> ckpt_path=auto       # resume from that run's newest checkpoint

Each run writes to its Hydra output directory: ``.hydra/`` (the resolved config),
``checkpoints/`` (``last.ckpt`` holds the masks and the method's state), ``csv/metrics.csv``,
``csv/hparams.yaml`` (the resolved config, as every logger gets it) and ``summary.json`` (test
accuracy, sparsity counted from the weights, per layer, the method and its arguments, the overrides,
wall time). The Hydra main returns the final value of ``optimized_metric`` (default ``test/acc``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from sparsetrain.apps.hydra_utils import (
    experiment_hparams,
    hydra_overrides,
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
    method_info,
    set_wandb_group,
)
from sparsetrain.core.report import sparsity_report

log = logging.getLogger(__name__)


def config_dir() -> str:
    """``configs/`` next to the package (editable install or source checkout), else inside it (wheel)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"sparsetrain's configs/ folder was not found next to {here.parents[1]}; install from a source "
        "checkout with `pip install -e .`"
    )


def dense_method(sparsity: float | None = None, structure: str | None = None):
    """``Dense()`` for ``sparsity=dense``; ``sparsity`` and ``structure`` are accepted and ignored so
    one sweep can cover ``sparsity=dense,gmp sparsity.method.sparsity=0.8,0.9``."""
    from sparsetrain.methods import Dense

    return Dense()


def train(cfg: DictConfig) -> dict:
    """Instantiate data, model, callbacks, loggers and trainer from ``cfg``; fit, test, summarise."""
    started = time.perf_counter()
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    # plain Python containers everywhere (no ListConfig in hyperparameters: checkpoints load with weights_only)
    datamodule = instantiate(cfg.data, _convert_="all")
    shape = {k: getattr(datamodule, k) for k in ("num_classes", "in_chans", "img_size") if cfg.model.get(k) is None}
    net = instantiate(cfg.model, **shape, _convert_="all")
    module = instantiate(cfg.module, net=net, num_classes=datamodule.num_classes, _convert_="all")

    sparsity = instantiate(cfg.sparsity)
    set_wandb_group(cfg.get("logger"))  # a multirun's jobs: one W&B group (unless logger.wandb.group is set)
    loggers = instantiate_loggers(cfg.get("logger"))
    # the SparsityCallback first: it must run before ModelCheckpoint and the user's callbacks
    callbacks = [sparsity, *instantiate_callbacks(cfg.get("callbacks"))]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), trainer)
    if cfg.get("ckpt_path") == "auto" and ckpt_path is not None:
        _keep_earlier_csv(loggers, trainer)  # a resumed attempt in the same folder: CSVLogger would delete metrics.csv
    overrides = hydra_overrides()
    log_hyperparameters(trainer, experiment_hparams(cfg, getattr(sparsity, "method", None), overrides))

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    _retire_requeue_checkpoints(trainer)  # else trainer.test under SLURM would load a stale hpc_ckpt
    fit_metrics = _scalars(trainer.callback_metrics)  # trainer.test resets callback_metrics
    val_acc = fit_metrics.get("val/acc")
    _csv_columns_from_file(loggers, trainer)  # after ddp_spawn the fit's metrics.csv was written by a worker
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0] if cfg.get("test", True) else {}

    report = sparsity.sparsity_report(module)  # from the model's weights: also right after ddp_spawn
    summary = make_summary(cfg, trainer, module, sparsity, report, test, val_acc, time.perf_counter() - started)
    summary["metrics"] = {**fit_metrics, **_scalars(test)}
    summary["overrides"] = overrides
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from sparsetrain.plot import write_run_plots  # layer_density.png, sparsity_schedule.png; never raises

        write_run_plots(output_dir, summary)
        log.info("\n%s", format_summary(summary, report.table()))
    _finish_wandb(loggers)
    return summary


def _scalars(metrics) -> dict:
    """``{name: float}`` of a metrics mapping (tensors or numbers)."""
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def resolve_ckpt_path(ckpt_path: str | None, trainer) -> str | None:
    """``ckpt_path`` as given, except ``auto``: this run's own newest checkpoint, or ``None`` (start fresh).

    ``auto`` looks in the run's output directory, where a requeued Slurm job (the same sweep
    directory and job number) finds what its first attempt left: ``last.ckpt`` of the first
    ModelCheckpoint with ``save_last`` (end of every epoch, and on an exception) and Lightning's
    ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir`` (written by Lightning's SLURM handler
    when the requeue signal arrives); the newer of the two by modification time. Every rank
    resolves it alike from the shared file system.
    """
    if ckpt_path != "auto":
        return ckpt_path
    candidates = []
    last = _last_checkpoint(trainer)
    if last is not None and Path(last).is_file():
        candidates.append(Path(last))
    hpc = [p for p in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt") if p.stem[len("hpc_ckpt_"):].isdigit()]
    if hpc:
        candidates.append(max(hpc, key=lambda p: int(p.stem[len("hpc_ckpt_"):])))
    if not candidates:
        log.info("ckpt_path=auto: no checkpoint of this run in %s yet; starting fresh", trainer.default_root_dir)
        return None
    chosen = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("ckpt_path=auto: resuming from %s", chosen)
    return str(chosen)


def _retire_requeue_checkpoints(trainer) -> None:
    """Under SLURM, delete Lightning's ``hpc_ckpt_<n>.ckpt`` (the requeue checkpoints) once a fit has ended.

    Lightning loads the newest of them in *every* ``fit``/``validate``/``test`` call with
    ``ckpt_path=None`` on SLURM, so after a requeued job finished, ``trainer.test`` would evaluate the
    weights of the requeue signal instead of the trained ones. The finished fit's state is in
    ``last.ckpt``. Rank 0 deletes, between two barriers, so that no rank tests another's weights.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return
    trainer.strategy.barrier("sparsetrain.retire_requeue_checkpoints")
    if trainer.is_global_zero:
        for path in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
            path.unlink()
            log.info("the fit is done: removed the requeue checkpoint %s (the final state is in last.ckpt)", path)
    trainer.strategy.barrier("sparsetrain.retire_requeue_checkpoints.done")


def _keep_earlier_csv(loggers, trainer) -> None:
    """Rename an earlier attempt's ``metrics.csv`` to ``metrics.attempt<k>.csv`` (k = 1, 2, ...), which
    Lightning's CSVLogger would otherwise delete when it starts in a folder that has one."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if isinstance(logger, CSVLogger) and trainer.is_global_zero:  # ranks are known from Trainer(): env
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file():
                k = 1 + len(list(path.parent.glob("metrics.attempt*.csv")))
                path.rename(path.with_name(f"metrics.attempt{k}.csv"))
                log.info("ckpt_path=auto: the earlier attempt's %s is kept as %s", path.name, f"metrics.attempt{k}.csv")


def _csv_columns_from_file(loggers, trainer) -> None:
    """Let every CSVLogger know the columns already in its ``metrics.csv``.

    Under ``ddp_spawn`` a worker process writes the fit's metrics; the CSVLogger of this process,
    pickled again into the test's workers, does not know those columns, and Lightning's CSVLogger
    then rewrites the file with a header that lacks them and fails (``ValueError: dict contains
    fields not in fieldnames``). Elsewhere the columns on file are the ones it knows: no change.
    """
    import csv

    from lightning.pytorch.loggers import CSVLogger

    if not trainer.is_global_zero:  # the other ranks' CSVLogger writes nothing
        return
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        writer = logger.experiment
        path = Path(getattr(writer, "metrics_file_path", ""))
        if path.is_file():
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def _fit_progress(trainer) -> tuple[int, int, bool]:
    """``(global_step, epochs, in_workers)`` of the fit. After ``ddp_spawn`` (``in_workers``) the
    progress stayed in the worker processes (Lightning sends back only the weights, the trainer's
    state and the metrics): it is read from the last checkpoint then."""
    step, epochs = trainer.global_step, trainer.current_epoch
    if step == 0 and getattr(trainer.strategy, "_start_method", None) in ("spawn", "fork", "forkserver"):
        last = _last_checkpoint(trainer)
        if last is not None and Path(last).is_file():
            import torch

            ckpt = torch.load(last, map_location="cpu", mmap=True, weights_only=False)
            step = int(ckpt.get("global_step", 0))
            progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
            epochs = int(progress.get("processed", ckpt.get("epoch", 0)))
        return step, epochs, True
    return step, epochs, False


def _last_checkpoint(trainer) -> str | None:
    """Where the first ModelCheckpoint with ``save_last`` writes ``last.ckpt``, else ``None``."""
    for cb in trainer.checkpoint_callbacks:
        if cb.save_last and cb.dirpath is not None:
            return str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
    return None


def optimized_value(summary: dict, key: str | None) -> float | None:
    """The final value of ``optimized_metric`` (a key of ``summary["metrics"]``: the val and test
    metrics); ``None`` for ``key=None`` and, with a warning, for a ``test/*`` key of a run with ``test=false``."""
    if key is None:
        return None
    metrics = summary.get("metrics") or {}
    if key in metrics:
        return metrics[key]
    if key.startswith("test/") and summary.get("test_acc") is None and not any(k.startswith("test/") for k in metrics):
        log.warning("optimized_metric=%s: the run did not test (test=false), so there is no value to return", key)
        return None
    raise KeyError(
        f"optimized_metric={key!r} is not a metric of this run; it logged: {', '.join(sorted(metrics)) or 'none'}"
    )


def make_summary(cfg, trainer, module, sparsity, report, test: dict, val_acc, wall_time: float) -> dict:
    everything = sparsity_report(dict(module.net.named_parameters()))
    method = getattr(sparsity, "method", None)
    steps, epochs, in_workers = _fit_progress(trainer)
    # after ddp_spawn this process's method never resolved its schedule: no target rather than a wrong one
    target = method.target_sparsity(steps) if method is not None and not in_workers else None
    info = method_info(method) or {}
    return {
        "test_acc": test.get("test/acc"),
        "test_loss": test.get("test/loss"),
        "val_acc": float(val_acc) if val_acc is not None else None,
        "sparsity": report.global_sparsity,
        "target_sparsity": target,
        "prunable_weights": report.numel,
        "nonzero_weights": report.numel - report.zeros,
        "all_params": everything.numel,
        "all_params_sparsity": everything.global_sparsity,
        "layers": report.to_dict()["layers"],
        "method": repr(method),  # sparsetrain-report groups by it
        "method_repr": repr(method),
        "method_name": info.get("name"),
        "method_args": info.get("args"),
        "model": cfg.model.get("name"),
        "data": cfg.data.get("name") or cfg.data._target_.rsplit(".", 1)[-1].removesuffix("DataModule").lower(),
        "seed": cfg.get("seed"),
        "epochs": epochs,
        "steps": steps,
        "wall_time_s": round(wall_time, 2),
        "output_dir": str(cfg.paths.output_dir),
        "last_checkpoint": _last_checkpoint(trainer),
    }


def format_summary(s: dict, table: str) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f} %"

    lines = [
        "=" * 72,
        f"sparsetrain summary: model={s['model']} data={s['data']} seed={s['seed']}",
        f"method:        {s['method']}",
        f"test accuracy: {pct(s['test_acc'])}   (loss {s['test_loss']:.4f})"
        if s["test_acc"] is not None
        else "test accuracy: not run (test=false)",
        f"sparsity:      {pct(s['sparsity'])} of {s['prunable_weights']:,} prunable weights are zero "
        f"(target {pct(s['target_sparsity'])}); {pct(s['all_params_sparsity'])} of all {s['all_params']:,} parameters",
        f"training:      {s['epochs']} epochs, {s['steps']} steps, wall time {s['wall_time_s']:.1f} s",
        "",
        table,
        "",
        f"outputs:       {s['output_dir']} (summary.json, csv/metrics.csv, checkpoints/, .hydra/)",
        "=" * 72,
    ]
    return "\n".join(lines)


def _finish_wandb(loggers) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final value of ``optimized_metric`` (default ``test/acc``: the
    value a sweeper such as Optuna optimises)."""
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
