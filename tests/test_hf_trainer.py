"""The Hugging Face ``Trainer`` with ``SparsityTrainerCallback`` on tiny GPT-2 and ViT models built from configs (no
download): exact zero counts in the trained model and after ``save_pretrained``, and an exact ``resume_from_checkpoint``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from sparsetrain.core import layer_counts
from tests.test_hf import SPARSITY, gpt2, vit

transformers = pytest.importorskip("transformers")
from sparsetrain.integrations.hf import STATE_FILE, SparsityTrainerCallback, report_first  # noqa: E402

STEPS = 8


class Data(Dataset):
    def __init__(self, kind: str, n: int = 8 * STEPS):
        g = torch.Generator().manual_seed(0)
        if kind == "lm":
            ids = torch.randint(0, 100, (n, 16), generator=g)
            self.items = [{"input_ids": i, "labels": i} for i in ids]
        else:
            x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
            self.items = [{"pixel_values": a, "labels": b} for a, b in zip(x, y)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class InOrder(transformers.Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def hf_trainer(model, callback, kind, output_dir, **args):
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=2, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    settings.update(args)
    return InOrder(model=model, args=transformers.TrainingArguments(**settings), train_dataset=Data(kind), callbacks=[callback])


METHODS = {
    "gmp": ("gmp", dict(sparsity=SPARSITY, start=0, end=4, every=2, distribution="uniform")),
    "rigl": ("rigl", dict(sparsity=SPARSITY, every=2, end=6, distribution="uniform")),
}


@pytest.mark.parametrize("kind,method", [("lm", "gmp"), ("image", "rigl")])
def test_the_trainers_own_optimizer_trains_to_exact_counts_that_survive_save_pretrained(kind, method, tmp_path):
    torch.manual_seed(0)
    model = gpt2(transformers) if kind == "lm" else vit(transformers)
    name, args = METHODS[method]
    callback = SparsityTrainerCallback(name, seed=0, **args)
    trainer = hf_trainer(model, callback, kind, tmp_path / "run")
    trainer.train()  # the Trainer makes its AdamW (passed to callbacks, or found by the engine at its first step)
    engine = callback.engine
    assert engine.step == STEPS and engine.optimizers == []  # released at the end
    params = dict(model.named_parameters())
    adam = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside Accelerate's wrapper
    for n, m in engine.masks.items():  # the engine found the Trainer's optimizer: its moments are reset where pruned
        assert int(adam.state[params[n]]["exp_avg"][~m].ne(0).sum()) == 0, n
    kept = layer_counts(engine.shapes, SPARSITY, "uniform")
    assert {n: int((params[n] != 0).sum()) for n in engine.targets} == kept  # counted in the trained model
    assert any("sparsity/global" in entry for entry in trainer.state.log_history)
    model.save_pretrained(tmp_path / "saved")
    cls = transformers.GPT2LMHeadModel if kind == "lm" else transformers.ViTForImageClassification
    loaded = dict(cls.from_pretrained(tmp_path / "saved").named_parameters())
    assert {n: int((loaded[n] != 0).sum()) for n in engine.targets} == kept
    for n, m in engine.masks.items():
        assert int(loaded[n][~m].ne(0).sum()) == 0, n


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    def run(resume=None):
        torch.manual_seed(0)
        model = gpt2(transformers)
        callback = SparsityTrainerCallback("rigl", seed=0, sparsity=SPARSITY, every=2, end=7, distribution="uniform")
        hf_trainer(model, callback, "lm", tmp_path, save_strategy="steps", save_steps=4).train(resume_from_checkpoint=resume)
        return model, callback.engine

    straight_model, straight = run()
    assert (tmp_path / "checkpoint-4" / STATE_FILE).is_file()
    saved = torch.load(tmp_path / "checkpoint-4" / STATE_FILE, weights_only=False)
    assert saved["step"] == 4 and saved["final"] is True and list(saved["masks"]) == list(straight.masks)
    resumed_model, resumed = run(resume=str(tmp_path / "checkpoint-4"))
    assert resumed.step == straight.step == STEPS
    for n, m in straight.masks.items():
        assert torch.equal(resumed.masks[n], m), n
    for n, p in straight_model.named_parameters():
        assert torch.equal(resumed_model.get_parameter(n), p), n


def test_a_resume_without_the_sparsity_state_fails_naming_the_folder(tmp_path):
    torch.manual_seed(0)
    hf_trainer(gpt2(transformers), SparsityTrainerCallback("static", sparsity=0.5), "lm", tmp_path, save_strategy="steps", save_steps=4).train()
    (tmp_path / "checkpoint-4" / STATE_FILE).unlink()
    torch.manual_seed(0)
    trainer = hf_trainer(gpt2(transformers), SparsityTrainerCallback("static", sparsity=0.5), "lm", tmp_path)
    with pytest.raises(Exception, match="no sparsetrain.pt is in .*checkpoint-4"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_resume_that_finds_another_runs_sparsity_state_fails_instead_of_pruning_the_weights(tmp_path):
    """Resuming from a folder outside output_dir without TrainingArguments(resume_from_checkpoint=...): the callback
    can only look in output_dir, where an older run left a checkpoint of the same step. Its masks do not fit the
    resumed weights: the resume fails instead of zeroing the weights those masks prune."""
    for seed, folder in ((0, "old"), (1, "new")):
        torch.manual_seed(seed)
        callback = SparsityTrainerCallback("static", sparsity=0.5, seed=seed)
        hf_trainer(gpt2(transformers), callback, "lm", tmp_path / folder, save_strategy="steps", save_steps=4).train()
    torch.manual_seed(0)
    trainer = hf_trainer(gpt2(transformers), SparsityTrainerCallback("static", sparsity=0.5, seed=1), "lm", tmp_path / "old")
    with pytest.raises(Exception, match="resume: the loaded sparsity state.* prunes weights that are non-zero"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "new" / "checkpoint-4"))


def test_load_best_model_at_end_takes_the_best_checkpoints_masks_and_says_when_it_predates_the_final_sparsity(tmp_path):
    class FallingLoss(InOrder):  # eval_loss rises with every evaluation: the best checkpoint is the first
        def evaluate(self, *args, **kwargs):
            metrics = {"eval_loss": float(self.state.global_step)}
            self.log(metrics)
            return metrics

    torch.manual_seed(0)
    model = gpt2(transformers)
    callback = SparsityTrainerCallback("gmp", seed=0, sparsity=SPARSITY, start=0, end=6, every=2, distribution="uniform")
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-2, use_cpu=True,
        report_to=[], disable_tqdm=True, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = FallingLoss(model=model, args=transformers.TrainingArguments(**settings), train_dataset=Data("lm"),
                          eval_dataset=Data("lm", 8), callbacks=[callback])  # fmt: skip
    with pytest.warns(UserWarning, match="the best checkpoint .*checkpoint-2.* saved at step 2 .* before the method reached"):
        trainer.train()
    best = torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=False)
    for n, m in best["masks"].items():  # the best weights came back with their own masks, nothing zeroed on top
        assert torch.equal(callback.engine.masks[n].cpu(), m), n
        assert int(model.get_parameter(n)[~m].ne(0).sum()) == 0, n
    assert callback.engine.handles == []


def test_report_first_sends_the_sparsity_metrics_to_the_report_to_loggers(tmp_path, monkeypatch):
    """TensorBoard (``report_to``) runs before the callbacks a user passes: with report_first it logs them too."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    torch.manual_seed(0)
    callback = SparsityTrainerCallback("gmp", seed=0, **METHODS["gmp"][1])
    trainer = hf_trainer(gpt2(transformers), callback, "lm", tmp_path, report_to=["tensorboard"])
    report_first(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb")).Reload()
    logged = events.Scalars("train/sparsity/global")
    assert sorted({e.step for e in logged}) == [2, 4, 6, 8]
    assert logged[-1].value == pytest.approx(callback.engine.report().global_sparsity)


def test_checkpoints_saved_into_a_trials_run_folder_get_the_sparsity_state_there(tmp_path):
    """hyperparameter_search saves each trial's checkpoints under output_dir/run-<n>/: the state goes with them."""

    class TrialFolder(InOrder):
        def _get_output_dir(self, trial):
            return str(tmp_path / "run-0")

    torch.manual_seed(0)
    callback = SparsityTrainerCallback("static", sparsity=0.5, seed=0)
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, use_cpu=True, report_to=[],
        save_strategy="steps", save_steps=4, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    TrialFolder(model=gpt2(transformers), args=transformers.TrainingArguments(**settings), train_dataset=Data("lm"), callbacks=[callback]).train()
    assert (tmp_path / "run-0" / "checkpoint-4" / STATE_FILE).is_file()
    assert (tmp_path / "run-0" / "checkpoint-8" / STATE_FILE).is_file()
    assert not (tmp_path / "checkpoint-4").exists()
