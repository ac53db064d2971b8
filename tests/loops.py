"""The same sparse run through every training loop the engine supports: a Lightning ``Trainer``, Lightning
Fabric, a hand-written PyTorch loop and the Hugging Face ``Trainer``.

Every run: ``TinyNet`` from ``seed_everything(0)``, SGD(lr 0.05, momentum 0.9, weight decay 1e-3), the 128 samples
of ``random_loader()`` in order, batches of 16, 2 epochs (16 optimizer steps), the engine's seed 0. Each
function returns ``(model, engine)``.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

import sparsetrain
from sparsetrain import SparsityCallback
from tests.helpers import TinyNet, random_loader, trainer

EPOCHS, STEPS = 2, 16


def _model_and_optimizer():
    L.seed_everything(0)
    model = TinyNet()
    return model, model.configure_optimizers()


def _quiet(fn):
    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return run


@_quiet
def lightning_run(method, args):
    L.seed_everything(0)
    model, cb = TinyNet(), SparsityCallback(method, seed=0, **args)
    trainer(max_epochs=EPOCHS, callbacks=[cb]).fit(model, random_loader())
    return model, cb.engine


@_quiet
def plain_run(method, args):
    model, optimizer = _model_and_optimizer()
    engine = sparsetrain.attach(model, optimizer, method, total_steps=STEPS, seed=0, **args)
    for _ in range(EPOCHS):
        for x, y in random_loader():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    engine.detach()
    return model, engine


@_quiet
def fabric_run(method, args):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model, optimizer = _model_and_optimizer()
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(random_loader())
    engine = sparsetrain.attach(model, optimizer, method, total_steps=STEPS, seed=0, **args)
    for _ in range(EPOCHS):
        for x, y in loader:
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    engine.detach()
    return model.module, engine


class _Samples(Dataset):
    """``random_loader()``'s samples as the dicts a Hugging Face Trainer collates."""

    def __init__(self):
        self.data = random_loader().dataset

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "labels": y}


def hf_trainer(model, callback, output_dir, optimizer=None, **args):
    """A Hugging Face Trainer over ``_Samples`` in order, with ``optimizer`` (default: the Trainer's own AdamW)."""
    import transformers

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=16, num_train_epochs=EPOCHS, use_cpu=True,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        label_names=["labels"], remove_unused_columns=False, dataloader_num_workers=0,
    )  # fmt: skip
    settings.update(args)
    optimizers = (None, None) if optimizer is None else (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    return InOrder(
        model=model, args=transformers.TrainingArguments(**settings), train_dataset=_Samples(), callbacks=[callback],
        optimizers=optimizers, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: nn.functional.cross_entropy(outputs, labels),
    )  # fmt: skip


@_quiet
def hf_run(method, args, output_dir):
    from sparsetrain.integrations.hf import SparsityTrainerCallback

    model, optimizer = _model_and_optimizer()
    callback = SparsityTrainerCallback(method, seed=0, **args)
    hf_trainer(model, callback, output_dir, optimizer).train()
    return model, callback.engine


LOOPS = {"lightning": lightning_run, "plain": plain_run, "fabric": fabric_run, "hf": hf_run}
