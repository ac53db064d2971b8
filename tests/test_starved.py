"""Layers left almost empty (sparsetrain.core.starved): the rule, the fit-start warning of fixed budgets and
the fit-end warning counted from the weights."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from sparsetrain import SparsityCallback
from sparsetrain.core.budgets import Budget
from sparsetrain.core.starved import starved_layers
from sparsetrain.methods import GMP, Static

# the MNIST-1D lottery MLP: 40 inputs, 500 hidden units, 10 classes
MLP = {"fc1.weight": (500, 40), "fc2.weight": (500, 500), "fc3.weight": (10, 500)}


def test_rule_is_the_pigeonhole_bound_with_a_tenth_of_the_units():
    assert starved_layers({"fc1.weight": 400}, MLP) == {
        "fc1.weight": "fc1.weight (500, 40) keeps 400 weights, fewer than its 500 units along dim 0: "
        "at least 100 of them have no weight"
    }
    assert starved_layers({"fc1.weight": 451}, MLP) == {}  # 49 empty units: below a tenth of 500
    assert list(starved_layers({"fc3.weight": 100}, MLP)) == ["fc3.weight"]  # 400 of 500 inputs unread
    assert "dim 0" in starved_layers({"conv.weight": 2}, {"conv.weight": (25, 1, 5)})["conv.weight"]
    assert starved_layers({"bias": 0}, {"bias": (10,)}) == {}


def test_uniform_budget_warns_at_fit_start_and_erk_does_not():
    with pytest.warns(UserWarning, match=r"distribution='uniform' at sparsity 0.98: 2 target\(s\).*fc1.weight.*fc3.weight"):
        Budget("uniform").check(MLP, 0.98)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Budget("erk").check(MLP, 0.98)  # ERK keeps 1,450 / 2,675 / 1,368 weights
        Budget("uniform").check(MLP, 0.9)


class MLPModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(method) -> list[str]:
    data = torch.utils.data.TensorDataset(torch.randn(8, 40), torch.randint(10, (8,)))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[SparsityCallback(method)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MLPModule(), torch.utils.data.DataLoader(data, batch_size=4))
    return [str(w.message) for w in caught if "units to connect" in str(w.message)]


def test_fit_end_warning_counts_the_weights_of_a_global_threshold():
    # global magnitude at 99.5 %: 1,375 weights left, nearly all in the first layer, whose init range (fan-in 40)
    # is 3.5x wider than the others' (fan-in 500)
    messages = fit(GMP(sparsity=0.995, start=0, end=1, every=1, distribution="global"))
    assert len(messages) == 1 and messages[0].startswith("sparsetrain: at the end of training")
    assert "net.2.weight (500, 500)" in messages[0] and "net.4.weight (10, 500)" in messages[0]


def test_no_warning_when_every_layer_has_enough_weights():
    assert fit(Static(sparsity=0.9, distribution="erk")) == []
