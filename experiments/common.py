"""What the experiment scripts share: ``--out`` and the results folder, quiet Lightning, the digits classifier,
a CSV written as runs finish, mean ± std cells, the command block under every table, and a timer.

Each script stays a plain ``python experiments/<name>.py [--out DIR]`` with its settings in its docstring.
"""

from __future__ import annotations

import argparse
import csv
import logging
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc``, with ``--out`` and ``--threads``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (1 is fastest for small nets)")
    return p


def quiet() -> None:
    """Lightning's per-fit messages and every warning off (a study prints one line per run)."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def command(script: str, argv: list[str] | None) -> str:
    """The command line that made a result, as it is written under its table."""
    return f"python experiments/{script} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def footer(rows: list[dict], cmd: str) -> list[str]:
    """The lines under a study's tables: how many runs, how long, and the command."""
    minutes = sum(r["seconds"] for r in rows) / 60
    return ["", f"{len(rows)} runs, {minutes:.1f} min of training and testing in total.", "", *command_block(cmd)]


def command_block(cmd: str) -> list[str]:
    return ["Command:", "", "```bash", cmd, "```", ""]


def markdown_table(corner: str, columns: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A markdown table: a header of ``corner`` and ``columns``, then a row ``name | cells`` per entry."""
    lines = ["| " + " | ".join([corner, *columns]) + " |", "|---|" + "---|" * len(columns)]
    return lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


def seeds_of(rows: list[dict]) -> str:
    """``"5 seeds (0, 1, 2, 3, 4)"``."""
    seeds = sorted({r["seed"] for r in rows})
    return f"{len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(map(str, seeds))})"


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``"99.56 ± 0.17"`` (percent by default); ``"—"`` for no values."""
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.2f} ± {scale * std:.2f}"


class Rows:
    """A CSV of ``fields`` written row by row as runs finish (a study can be stopped and read at any time);
    the rows are kept in ``.rows``. ``line(row)`` is what is printed for each."""

    def __init__(self, path: Path, fields: list[str], line=None):
        self.path, self.fields, self.line, self.rows = Path(path), fields, line, []

    def __enter__(self) -> Rows:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields)
        self._writer.writeheader()
        return self

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self._writer.writerow(row)
        self._file.flush()
        if self.line is not None:
            print(self.line(row), flush=True)
        return row

    def __exit__(self, *exc) -> None:
        self._file.close()


def dense_sgd_step(model, batch: int = 64, size: int = 32):
    """``step()``: one dense SGD training step (momentum 0.9) of ``model`` on a fixed random ``size`` x ``size`` batch."""
    import torch

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------ the digits studies
def digits_module(lr: float = 0.1):
    """``digits_cnn`` (65,440 prunable weights) with SGD (momentum 0.9, Nesterov, weight decay 5e-4, cosine)."""
    from sparsetrain.apps.models import build_model
    from sparsetrain.apps.module import ClassificationModule

    net = build_model("digits_cnn", num_classes=10, in_chans=1, img_size=8)
    return ClassificationModule(net, num_classes=10, optimizer="sgd", lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4, lr_schedule="cosine")  # fmt: skip


def digits_data(seed: int):
    from sparsetrain.apps.data import DigitsDataModule

    return DigitsDataModule(batch_size=64, seed=seed, split_seed=0)


def quiet_trainer(epochs: int, callbacks: list, **kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or validation."""
    import lightning as L

    settings = dict(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    return L.Trainer(**{**settings, **kwargs}, callbacks=callbacks)
