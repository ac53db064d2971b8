"""Hugging Face transformers models (tiny, built from configs; nothing is downloaded): ViT and GPT-2.

GPT-2's linear layers are ``transformers.pytorch_utils.Conv1D`` (not an ``nn.Linear``; weight
stored ``(in, out)``), default targets by class name. Its ``lm_head`` (an ``nn.Linear``) is tied to
the token embedding ``transformer.wte``: the one shared Parameter is a default target through
``lm_head``, *once*, under the name ``named_parameters`` gives it first, ``transformer.wte.weight``
(so the embedding rows are sparse too: zeros in the output projection are zeros in the input
embedding). It stays one tied Parameter through training and ``save_pretrained``/``from_pretrained``;
``exclude="*.wte.weight"`` keeps it dense. The position embedding ``wpe`` is never a target.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsetrain import SparsityCallback
from sparsetrain.core import layer_counts, select_targets
from sparsetrain.methods import GMP, RigL
from tests.helpers import trainer

SPARSITY = 0.8
STEPS = 6
CONV1D = [f"transformer.h.{i}.{layer}.weight" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def vit(transformers):
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=8, patch_size=4, num_channels=1, num_labels=10,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def gpt2(transformers, **kwargs):
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0, **kwargs
    )
    return transformers.GPT2LMHeadModel(config)


class HFModule(L.LightningModule):
    """Wraps a HF model: image classification (``pixel_values``, labels) or causal LM (``input_ids``)."""

    def __init__(self, hf: nn.Module, kind: str):
        super().__init__()
        self.hf, self.kind = hf, kind

    def training_step(self, batch, batch_idx):
        if self.kind == "lm":
            (ids,) = batch
            return self.hf(input_ids=ids, labels=ids).loss
        x, y = batch
        return nn.functional.cross_entropy(self.hf(pixel_values=x).logits, y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


def loader(kind: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = 8 * STEPS
    if kind == "lm":
        data = TensorDataset(torch.randint(0, 100, (n, 16), generator=g))
    else:
        data = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=False)


def example_input(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "lm":
        return {"input_ids": torch.randint(0, 100, (2, 16), generator=g)}
    return {"pixel_values": torch.randn(2, 1, 8, 8, generator=g)}


METHODS = {
    "gmp": lambda: GMP(sparsity=SPARSITY, start=0, end=4, every=1, distribution="uniform"),
    "rigl": lambda: RigL(sparsity=SPARSITY, every=2, end=6, distribution="uniform"),
}


def fit(transformers, build, kind: str, method: str):
    torch.manual_seed(0)
    hf = build(transformers)
    fresh_keys = list(build(transformers).state_dict())
    module = HFModule(hf, kind)
    cb = SparsityCallback(METHODS[method]())
    trainer(max_steps=STEPS, max_epochs=-1, callbacks=[cb]).fit(module, loader(kind))
    assert cb.step == STEPS
    return hf, cb, fresh_keys


def assert_exact_counts(hf: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Zeros counted in ``hf``'s weights equal ``layer_counts(shapes, 0.8, "uniform")``; returns the zero masks."""
    params = dict(hf.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    kept = layer_counts(shapes, SPARSITY, "uniform")
    zeros = {n: params[n].detach() == 0 for n in names}
    assert {n: int(z.sum()) for n, z in zeros.items()} == {n: params[n].numel() - kept[n] for n in names}
    return zeros


def assert_save_and_load(transformers, hf: nn.Module, cls, kind: str, zeros: dict[str, torch.Tensor], tmp_path):
    hf.eval()
    hf.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert list(loaded.state_dict()) == list(hf.state_dict())
    with torch.no_grad():
        assert torch.equal(hf(**example_input(kind)).logits, loaded(**example_input(kind)).logits)
    params = dict(loaded.named_parameters())
    for n, z in zeros.items():
        assert torch.equal(params[n].detach() == 0, z), n
    return loaded


@pytest.mark.parametrize("method", ["gmp", "rigl"])
def test_vit_trains_to_exact_counts_and_survives_save_pretrained(transformers, method, tmp_path):
    hf, cb, fresh_keys = fit(transformers, vit, "image", method)
    names = [n.removeprefix("hf.") for n in cb.targets]
    assert names == list(select_targets(vit(transformers)))
    assert "vit.embeddings.patch_embeddings.projection.weight" in names and "classifier.weight" in names
    assert sum(n.startswith("vit.layers.") or n.startswith("vit.encoder.") for n in names) == 2 * 6  # q, k, v, o, fc1, fc2
    assert not any("norm" in n or n.endswith(".bias") or "cls_token" in n or "position" in n for n in names)
    zeros = assert_exact_counts(hf, names)
    assert list(hf.state_dict()) == fresh_keys
    assert_save_and_load(transformers, hf, transformers.ViTForImageClassification, "image", zeros, tmp_path)


@pytest.mark.parametrize("method", ["gmp", "rigl"])
def test_gpt2_conv1d_and_tied_lm_head_train_to_exact_counts_and_survive_save_pretrained(transformers, method, tmp_path):
    hf, cb, fresh_keys = fit(transformers, gpt2, "lm", method)
    names = [n.removeprefix("hf.") for n in cb.targets]
    # the Conv1D layers, plus the tied lm_head/wte weight once, under its first name
    assert names == ["transformer.wte.weight", *CONV1D]
    assert isinstance(hf.transformer.h[0].attn.c_attn, transformers.pytorch_utils.Conv1D)
    assert tuple(hf.transformer.h[0].mlp.c_fc.weight.shape) == (32, 128)  # (in, out): transposed vs nn.Linear
    assert hf.lm_head.weight is hf.transformer.wte.weight  # still tied after training
    zeros = assert_exact_counts(hf, names)  # counted once for the shared weight
    assert torch.equal(hf.lm_head.weight == 0, zeros["transformer.wte.weight"])
    assert not bool((hf.transformer.wpe.weight == 0).any())  # the position embedding stays dense
    assert list(hf.state_dict()) == fresh_keys  # lm_head.weight included, as in a fresh model
    loaded = assert_save_and_load(transformers, hf, transformers.GPT2LMHeadModel, "lm", zeros, tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again after from_pretrained


def test_gpt2_default_selection_tied_untied_and_excluded(transformers):
    tied = select_targets(gpt2(transformers))
    assert list(tied) == ["transformer.wte.weight", *CONV1D]  # lm_head.weight is the same Parameter: not twice
    untied = select_targets(gpt2(transformers, tie_word_embeddings=False))
    assert list(untied) == [*CONV1D, "lm_head.weight"]  # an untied embedding is not a target, the head is
    assert list(select_targets(gpt2(transformers), exclude="*.wte.weight")) == CONV1D


def test_a_conv1d_is_found_by_class_name_without_transformers():
    class Conv1D(nn.Module):  # the shape of transformers.pytorch_utils.Conv1D: y = x @ W + b, W (in, out)
        def __init__(self, nf, nx):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    class Conv1DNot2D(Conv1D):
        def __init__(self):
            nn.Module.__init__(self)
            self.weight = nn.Parameter(torch.randn(4))

    model = nn.Sequential(Conv1D(8, 4), Conv1DNot2D(), nn.Linear(8, 2), nn.Embedding(5, 4))
    assert list(select_targets(model)) == ["0.weight", "2.weight"]
    assert layer_counts({"0.weight": (4, 8), "2.weight": (2, 8)}, 0.5, "erk") == layer_counts(
        {"0.weight": (8, 4), "2.weight": (2, 8)}, 0.5, "erk"
    )  # budgets see only the shape: the transposed storage changes nothing


def test_gpt2_conv1d_2_4_groups_run_along_the_input_dim_in_the_saved_model(transformers, tmp_path):
    """Issue 21, item 4: Conv1D stores (in, out); its N:M groups are 4 consecutive inputs along dim 0. RigL moves
    the masks (regrowth inside the groups), and the model saved with save_pretrained is 2:4 along its inputs."""
    from sparsetrain import export

    torch.manual_seed(0)
    hf = gpt2(transformers)
    cb = SparsityCallback(RigL(0.5, "uniform", structure="2:4", every=2, drop_fraction=0.5, end=6))
    trainer(max_steps=STEPS, max_epochs=-1, callbacks=[cb]).fit(HFModule(hf, "lm"), loader("lm"))
    hf.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    for model in (hf, loaded):
        params = dict(model.named_parameters())
        for n in CONV1D:
            w, mask = params[n].detach(), cb.masks[f"hf.{n}"]
            assert ((mask.unfold(0, 4, 4).sum(-1)) == 2).all(), n  # every 4 inputs of every output keep 2
            assert ((w != 0).unfold(0, 4, 4).sum(-1) <= 2).all() and ((w != 0) & ~mask).sum() == 0, n
        wte = params["transformer.wte.weight"].detach()  # the tied lm_head, an nn.Linear: along dim 1
        assert ((wte != 0).unfold(1, 4, 4).sum(-1) <= 2).all()
    conv1d = [m for m in loaded.modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert len(conv1d) == 8 and all(export.is_n_m_sparse(m) for m in conv1d)
    assert not any(export.is_n_m_sparse(m.weight) for m in conv1d)  # a bare (in, out) tensor is read along dim 1
    assert all(r["n_m"] for r in export.n_m_report(loaded).values())
