"""Stochastic subnetwork annealing: the sampling core, the method, and the callback glue in real Trainers.

Statistical checks use fixed seeds and a binomial 5-sigma bound: an empirical inclusion rate
over ``n`` Bernoulli(p) trials must lie within ``5 * sqrt(p (1 - p) / n)`` of ``p`` (a correct
sampler fails such a check with probability below 1e-6 per check).
"""

import copy
import math
import pickle
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core import budget_masks, layer_counts, magnitude_scores
from sparsetrain.core.stochastic import (
    ParameterSwap,
    StochasticKernel,
    annealing_scale,
    derive_seed,
    sample_masked_weight,
)
from sparsetrain.methods import GMP, StochasticAnnealing
from sparsetrain.apps.weights_from import WeightsFrom
from tests.helpers import TinyNet, random_loader, straight_and_resumed, trainer

TARGETS = ["conv.weight", "fc1.weight", "fc2.weight"]


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------ the curves
@pytest.mark.parametrize(
    "schedule, middle",
    [("linear", 0.5), ("cosine", 0.5), ("exponential", 1 / (1 + math.exp(2.5)))],  # exponential, rate 5
)
def test_probability_follows_each_curve_and_is_exactly_zero_at_end(schedule, middle):
    method = StochasticAnnealing(0.8, initial_probability=0.4, schedule=schedule, start=10, end=30)
    method.setup(100)
    p = method.inclusion_probability
    assert p(0) == 1.0  # dense before start
    assert p(10) == pytest.approx(0.4)
    assert p(20) == pytest.approx(0.4 * middle)
    assert p(30) == 0.0 and p(31) == 0.0 and p(1000) == 0.0  # exactly zero from end on
    values = [p(t) for t in range(10, 31)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing to 0
    assert not method.stochastic(10)  # no target chosen yet (the callback does that at start)
    if schedule == "cosine":
        assert p(15) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    if schedule == "exponential":
        assert p(15) == pytest.approx(0.4 * (math.exp(-1.25) - math.exp(-5)) / (1 - math.exp(-5)))
        assert annealing_scale(29, 10, 30, schedule, rate=1e-9) == pytest.approx(1 / 20)  # rate -> 0: linear


def test_start_equal_to_end_is_one_shot():
    assert annealing_scale(5, 5, 5) == 0.0 and annealing_scale(4, 5, 5) == 1.0


# ----------------------------------------------------------- the sampling core
def setup_tensors(n_out=50, n_in=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=g)
    target = torch.rand(n_out, n_in, generator=g) < 0.3
    return weight, target


def draw(kernel, weight, target, base, scale, samples, seed=7):
    """Inclusion indicator of every position in ``samples`` training forwards (keys (seed, step))."""
    return torch.stack(
        [kernel.sample([weight], [target], [base], scale, derive_seed(seed, step))[0] != 0 for step in range(samples)]
    )


def test_inclusion_rate_matches_p_and_target_is_always_included():
    weight, target = setup_tensors()
    kernel = StochasticKernel("eager")
    p, samples = 0.5 * 0.6, 400
    kept = draw(kernel, weight, target, torch.tensor(0.5), 0.6, samples)
    assert kept[:, target].all()  # the target subnetwork is in every sample
    excluded = kept[:, ~target].float()
    n = excluded.numel()  # about 1400 weights x 400 samples
    assert abs(excluded.mean().item() - p) < five_sigma(p, n)
    per_weight = excluded.mean(0)  # each excluded weight on its own: 400 trials
    assert ((per_weight - p).abs() < five_sigma(p, samples)).all()
    # samples of different training forwards differ; the same key gives the same sample
    assert not torch.equal(kept[0], kept[1])
    again = kernel.sample([weight], [target], [torch.tensor(0.5)], 0.6, derive_seed(7, 0))[0] != 0
    assert torch.equal(again, kept[0])


def test_random_per_weight_probabilities_are_respected():
    weight, target = setup_tensors(seed=1)
    base = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.8  # b_i in [0, 0.8)
    samples, scale = 400, 0.75
    kept = draw(StochasticKernel("eager"), weight, target, base, scale, samples).float()
    p = (base * scale)[~target]
    rate = kept[:, ~target].mean(0)
    bound = 5 * torch.sqrt(p * (1 - p) / samples) + 1e-6
    assert ((rate - p).abs() <= bound).all()
    assert torch.corrcoef(torch.stack([rate, p]))[0, 1] > 0.95


def test_sampling_leaves_the_global_rng_alone_and_masks_the_gradient():
    weight, target = setup_tensors()
    weight.requires_grad_(True)
    state = torch.get_rng_state()
    out = sample_masked_weight(weight, target, 0.3, 11)
    assert torch.equal(torch.get_rng_state(), state)
    keep = out.detach() != 0
    upstream = torch.randn(weight.shape)
    (out * upstream).sum().backward()
    assert torch.equal(weight.grad, torch.where(keep, upstream, 0.0))  # grad = g * sampled mask
    assert torch.equal(out.detach(), torch.where(keep, weight.detach(), 0.0))


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    weight, target = setup_tensors()
    kernel, eager = StochasticKernel("compiled"), StochasticKernel("eager")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*eager stochastic mask kernel") as record:
        out = kernel.sample([weight], [target], [torch.tensor(0.5)], 0.5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel.sample([weight], [target], [torch.tensor(0.5)], 0.5, 3)  # no second warning
    assert len(record) == 1 and not kernel.uses_compile(torch.device("cpu"))
    assert torch.equal(out[0], eager.sample([weight], [target], [torch.tensor(0.5)], 0.5, 3)[0])
    assert StochasticKernel("auto").uses_compile(torch.device("cuda")) and not StochasticKernel().uses_compile(torch.device("cpu"))


@pytest.mark.slow
def test_compiled_and_eager_give_identical_samples_and_gradients():
    """~10 s of inductor compilation on CPU."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 8, 3, 3), (10, 32)]
    targets = [torch.rand(s, generator=g) < 0.3 for s in shapes]
    bases = [torch.tensor(0.4), torch.rand(shapes[1], generator=g) * 0.5]  # constant and per-weight
    results = {}
    for kind in ("eager", "compiled"):
        weights = [torch.randn(s, generator=torch.Generator().manual_seed(1)).requires_grad_() for s in shapes]
        kernel = StochasticKernel(kind)
        outs = []
        for step in range(3):  # the scale changes every step: no recompilation, same numbers
            out = kernel.sample(weights, targets, bases, 1.0 - 0.3 * step, derive_seed(5, step))
            sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out).backward()
            outs += [o.detach() for o in out]
        assert kernel.uses_compile(torch.device("cpu")) == (kind == "compiled")  # no silent fallback
        results[kind] = outs + [w.grad for w in weights]
    assert all(torch.equal(a, b) for a, b in zip(results["eager"], results["compiled"]))


def test_parameter_swap_covers_shared_and_parent_read_weights():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.attn = nn.MultiheadAttention(4, 1)  # reads out_proj.weight directly, not through out_proj()

    net = Net()
    params = {"a.weight": net.a.weight, "attn.out_proj.weight": net.attn.out_proj.weight}
    keys = list(net.state_dict())
    swap = ParameterSwap(net, params)
    zeros = [torch.zeros(4, 4), torch.zeros(4, 4)]
    swap.swap_in(zeros)
    assert net.a.weight is zeros[0] and net.b.weight is zeros[0] and net.attn.out_proj.weight is zeros[1]
    x = torch.randn(3, 1, 4)
    assert torch.equal(net.attn(x, x, x)[0], net.attn.out_proj.bias.expand(3, 1, 4))  # the swapped zeros were used
    assert list(net.state_dict()) == keys
    swap.restore()
    assert net.a.weight is params["a.weight"] and isinstance(net.b.weight, nn.Parameter)


# ------------------------------------------------------- the callback in a Trainer
class Net(TinyNet):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class Probe(Callback):
    """After the SparsityCallback: the weights each forward sees and the gradients each step applies."""

    def __init__(self, cb):
        self.cb, self.seen, self.grads, self.after_step, self.val_weights = cb, {}, {}, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = dict(pl_module.named_parameters())  # the swapped tensors, under the usual names
        self.seen[trainer.global_step] = {n: params[n].detach().clone() for n in TARGETS}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step] = {n: p.grad.clone() for n, p in self.cb.targets.items()}

    def on_train_batch_end(self, trainer, pl_module, *args):
        assert all(type(pl_module.get_parameter(n)) is nn.Parameter for n in TARGETS)  # parameters are back
        optimizer = trainer.optimizers[0]
        self.after_step[trainer.global_step] = {
            n: (p.detach().clone(), optimizer.state[p]["momentum_buffer"].clone()) for n, p in self.cb.targets.items()
        }

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        params = dict(pl_module.named_parameters())  # get_parameter() would refuse a swapped tensor
        self.val_weights.append({n: params[n].clone() for n in TARGETS})


def test_training_forwards_sample_masks_and_gradients_flow_through_samples():
    L.seed_everything(0)
    model = Net()
    method = StochasticAnnealing(0.8, initial_probability=0.6, schedule="cosine", end=10)
    cb = SparsityCallback(method, seed=3)
    probe = Probe(cb)
    trainer(max_epochs=2, callbacks=[cb, probe], limit_val_batches=0).fit(model, random_loader())  # 16 steps
    masks = cb.masks
    for step in range(10):  # stochastic phase
        seen, grads = probe.seen[step], probe.grads[step]
        kept = {n: seen[n] != 0 for n in TARGETS}
        assert all(kept[n][masks[n]].all() for n in TARGETS)  # target always in
        included = torch.cat([kept[n][~masks[n]] for n in TARGETS]).float()
        p = method.inclusion_probability(step)
        assert abs(included.mean().item() - p) < five_sigma(p, included.numel()), step
        for n in TARGETS:
            assert (grads[n][~kept[n]] == 0).all()  # no gradient for weights left out of this forward
        sampled_out = torch.cat([grads[n][kept[n] & ~masks[n]] for n in TARGETS])
        assert (sampled_out != 0).float().mean() > 0.5  # sampled excluded weights learn: not masked
    assert not torch.equal(probe.seen[0]["fc1.weight"] != 0, probe.seen[1]["fc1.weight"] != 0)
    # before end the excluded weights keep (and change) their values
    before = probe.after_step[9]
    assert all((before[n][0][~masks[n]] != 0).all() for n in TARGETS)
    # from end on exactly static sparse: excluded weights and their momentum zero after every step,
    # forwards see the plain (hard-masked) parameters, gradients of excluded weights are zero
    for step in range(10, 17):
        for n in TARGETS:
            weight, momentum = probe.after_step[step][n]
            assert (weight[~masks[n]] == 0).all() and (momentum[~masks[n]] == 0).all(), (step, n)
            assert (weight[masks[n]] != 0).all()
    for step in range(10, 16):
        assert all(torch.equal(probe.seen[step][n] != 0, masks[n]) for n in TARGETS)
        assert all((probe.grads[step][n][~masks[n]] == 0).all() for n in TARGETS)
    assert {n: int(m.sum()) for n, m in masks.items()} == layer_counts({n: tuple(m.shape) for n, m in masks.items()}, 0.8, "uniform")
    assert cb.sparsity_report().zeros == sum(int((~m).sum()) for m in masks.values())


def test_target_is_largest_magnitude_at_start():
    L.seed_everything(0)
    model = Net()
    start_weights = {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 3:  # start=3: the target is chosen from these weights
                start_weights.update({n: pl_module.get_parameter(n).detach().clone() for n in TARGETS})

    cb = SparsityCallback(StochasticAnnealing(0.75, start=3, end=9, distribution="global"))
    trainer(max_epochs=2, callbacks=[Grab(), cb], limit_val_batches=0).fit(model, random_loader())
    want = budget_masks(magnitude_scores(start_weights), 0.75, "global")
    assert all(torch.equal(want[n], cb.masks[n]) for n in TARGETS)


def test_a_second_fit_of_a_new_model_with_the_same_callback_anneals_again():
    """One callback, two models (the Hugging Face Trainer's model_init builds a new one per train() or search
    trial): the second model gets fresh masks and its own target at ``start``, not the first run's state."""
    cb = SparsityCallback(StochasticAnnealing(0.75, start=3, end=9))
    for seed in (0, 1):
        L.seed_everything(seed)
        model = Net()
        trainer(max_epochs=2, callbacks=[cb], limit_val_batches=0).fit(model, random_loader())
        zeros = sum(int(model.get_parameter(n).eq(0).sum()) for n in TARGETS)
        total = sum(model.get_parameter(n).numel() for n in TARGETS)
        assert zeros == round(0.75 * total), (seed, zeros, total)


def test_evaluation_uses_the_deterministic_target_network(tmp_path):
    L.seed_everything(0)
    model = Net()
    cb = SparsityCallback(StochasticAnnealing(0.8, initial_probability=0.5, end=100))  # still annealing at the end
    probe = Probe(cb)
    t = trainer(max_epochs=1, callbacks=[cb, probe, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                enable_checkpointing=True, limit_val_batches=2)
    with pytest.warns(UserWarning, match="beyond"):
        t.fit(model, random_loader(), random_loader(n=32, seed=1))
    assert all((model.get_parameter(n)[~cb.masks[n]] != 0).any() for n in TARGETS)  # excluded weights still live
    # validation during fit (sanity check at step 0, then after the last step) saw w * mask
    assert len(probe.val_weights) == 4
    for seen in probe.val_weights:
        assert all((seen[n][~cb.masks[n]] == 0).all() and (seen[n][cb.masks[n]] != 0).all() for n in TARGETS)
    assert all(torch.equal(probe.val_weights[-1][n], model.get_parameter(n).detach() * cb.masks[n]) for n in TARGETS)
    # prediction (twice) equals a copy of the model whose weights are multiplied by the target masks
    loader = random_loader(n=32, seed=2)
    first = torch.cat(t.predict(model, loader))
    second = torch.cat(trainer(callbacks=[cb]).predict(model, loader))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n in TARGETS:
            reference.get_parameter(n).mul_(cb.masks[n])
    expected = torch.cat(trainer().predict(reference, loader))
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(type(model.get_parameter(n)) is nn.Parameter for n in TARGETS)
    # a fresh Trainer and callback evaluating the mid-annealing checkpoint take its masks
    fresh = SparsityCallback(StochasticAnnealing(0.8, initial_probability=0.5, end=100))
    from_ckpt = torch.cat(trainer(callbacks=[fresh]).predict(Net(), loader, ckpt_path=tmp_path / "last.ckpt"))
    assert torch.equal(from_ckpt, expected)


def test_state_dict_keys_deepcopy_and_pickle_while_annealing():
    L.seed_everything(0)
    model = Net()
    keys = list(model.state_dict())
    checked = []

    class Copy(Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):  # swapped tensors in place
            assert list(pl_module.state_dict()) == keys
            assert not pl_module.fc1.weight.is_leaf

        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step in (2, 5):
                assert list(pl_module.state_dict()) == keys
                clone = copy.deepcopy(pl_module)
                assert list(clone.state_dict()) == keys and all(type(p) is nn.Parameter for p in clone.parameters())
                x = torch.randn(4, 1, 8, 8)
                assert torch.equal(clone.eval()(x), pl_module.eval()(x))
                pl_module.train()
                pickle.loads(pickle.dumps(cb))  # ddp_spawn pickles the callback
                checked.append(trainer.global_step)

    cb = SparsityCallback(StochasticAnnealing(0.8, end=12, probabilities="random"))
    trainer(max_epochs=1, callbacks=[cb, Copy()]).fit(model, random_loader())
    assert checked == [2, 5] and list(model.state_dict()) == keys


def test_exact_resume_from_epoch_checkpoint(tmp_path):
    """2E epochs straight == E epochs, checkpoint, fresh Trainer resumed to 2E: masks, base probabilities, weights."""

    def make():  # target at step 4, stochastic until 24: the checkpoint at 16 is mid-annealing
        return SparsityCallback(
            StochasticAnnealing(0.8, start=4, end=24, probabilities="random", schedule="exponential"), seed=5
        )

    straight, cb_straight, resumed, cb_resumed = straight_and_resumed(make, tmp_path)
    assert cb_resumed.step == cb_straight.step == 32
    for n in TARGETS:
        assert torch.equal(cb_straight.masks[n], cb_resumed.masks[n])
        assert torch.equal(cb_straight.method._base[n], cb_resumed.method._base[n])
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["SparsityCallback"]
    assert state["step"] == 16 and state["method"]["base"]["fc1.weight"].shape == (32, 128)
    # the checkpoint holds the live excluded weights (mid-annealing), not zeros
    ckpt_weights = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["fc1.weight"]
    assert (ckpt_weights[~state["masks"]["fc1.weight"]] != 0).all()


def test_fine_tune_from_another_runs_checkpoint(tmp_path):
    """GMP run -> checkpoint -> WeightsFrom + target='from_checkpoint': same masks, loaded weights."""
    L.seed_everything(0)
    gmp = SparsityCallback(GMP(0.8, start=0, end=6, every=2))
    source = TinyNet()
    trainer(max_epochs=1, callbacks=[gmp, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
            enable_checkpointing=True).fit(source, random_loader())
    ckpt = tmp_path / "last.ckpt"
    loaded = {}

    class Grab(Callback):
        def on_fit_start(self, trainer, pl_module):
            loaded.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    cb = SparsityCallback(StochasticAnnealing(target="from_checkpoint", masks=str(ckpt), end=4))
    assert cb.method.sparsity == pytest.approx(0.8, abs=1e-3)
    trainer(max_epochs=1, callbacks=[WeightsFrom(ckpt), cb, Grab()]).fit(TinyNet(), random_loader())
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert all(torch.equal(cb.masks[n], gmp.masks[n]) for n in TARGETS)
    with pytest.raises(SparsityConfigError, match="disagrees with the masks"):
        StochasticAnnealing(0.5, target="from_checkpoint", masks=ckpt)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: StochasticAnnealing(), "sparsity is required with target='magnitude'"),
        (lambda: StochasticAnnealing(0.9, target="gradient"), "target='gradient' is unknown; allowed: magnitude, random, from_checkpoint"),
        (lambda: StochasticAnnealing(0.9, probabilities="uniform"), "probabilities='uniform' is unknown; allowed: constant, random"),
        (lambda: StochasticAnnealing(0.9, schedule="step"), "schedule='step' is unknown; allowed: linear, cosine, exponential"),
        (lambda: StochasticAnnealing(0.9, initial_probability=1.5), r"initial_probability=1.5 must be a number in \[0, 1\]"),
        (lambda: StochasticAnnealing(0.9, rate=0), "rate=0 must be a number > 0"),
        (lambda: StochasticAnnealing(0.9, start=10, end=5), "end=5 is before start=10"),
        (lambda: StochasticAnnealing(0.9, masks={"a": torch.ones(2, dtype=torch.bool)}), "masks= is only used with target='from_checkpoint'"),
        (lambda: StochasticAnnealing(target="from_checkpoint"), "target='from_checkpoint' needs masks="),
        (lambda: StochasticAnnealing(target="from_checkpoint", masks="nowhere.ckpt"), "masks='nowhere.ckpt': no such file"),
        (lambda: StochasticAnnealing(0.9, distribution="gaussian"), "distribution='gaussian' is unknown"),
    ],
)
def test_bad_config_fails_at_construction(make, match):
    with pytest.raises(SparsityConfigError, match=match):
        make()


def test_masks_for_other_targets_fail_at_fit_start():
    masks = {"fc1.weight": torch.ones(32, 128, dtype=torch.bool)}
    cb = SparsityCallback(StochasticAnnealing(target="from_checkpoint", masks=masks, end=4))
    with pytest.raises(SparsityConfigError, match="has masks for .*fc1.weight.* but the callback's targets are"):
        trainer(max_epochs=1, callbacks=[cb]).fit(TinyNet(), random_loader())


# ----------------------------------------------------------------------- configs
def test_hydra_config_and_preset_compose(tmp_path):
    pytest.importorskip("hydra")  # the apps extra; the library runs without it
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sparsetrain.apps.train import config_dir

    torch.save(Net().state_dict(), tmp_path / "w.pt")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["sparsity=annealing", "sparsity.method.sparsity=0.95"])
        callback = instantiate(cfg.sparsity)
        assert isinstance(callback.method, StochasticAnnealing) and callback.method.sparsity == 0.95
        cfg = compose("train", overrides=["experiment=annealing_digits", f"weights_from={tmp_path / 'w.pt'}"])
    assert isinstance(instantiate(cfg.sparsity).method, StochasticAnnealing)
    loader = instantiate(cfg.callbacks.weights_from)
    assert isinstance(loader, WeightsFrom) and loader.path == tmp_path / "w.pt"


# -------------------------------------------------------------------------- DDP
class SaveSamples(Callback):
    """After the SparsityCallback: the sampled weights of every training forward, saved per rank."""

    def __init__(self, cb, folder):
        self.cb, self.folder, self.samples = cb, folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        self.samples.append({n: params[n].detach() != 0 for n in TARGETS})

    def on_train_end(self, trainer, pl_module):
        torch.save({"samples": self.samples, "masks": self.cb.masks, "w": dict(pl_module.named_parameters()),
                    "x": trainer.train_dataloader.sampler.__class__.__name__},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


def test_ddp_ranks_sample_identical_masks(tmp_path):
    """Two CPU processes (gloo, ddp_spawn: the callback is pickled), each on its half of the data."""
    L.seed_everything(0, verbose=False)
    cb = SparsityCallback(StochasticAnnealing(0.8, distribution="global", end=6, probabilities="random"))
    t = trainer(max_epochs=2, strategy="ddp_spawn", devices=2, callbacks=[cb, SaveSamples(cb, str(tmp_path))])
    t.fit(TinyNet(), random_loader(n=64, batch_size=8))  # 4 steps per epoch and rank
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["x"] == "DistributedSampler"  # each rank saw its own half
    assert len(r0["samples"]) == len(r1["samples"]) == 8
    for step, (s0, s1) in enumerate(zip(r0["samples"], r1["samples"])):
        assert all(torch.equal(s0[n], s1[n]) for n in TARGETS), step
    assert not torch.equal(r0["samples"][0]["fc1.weight"], r0["samples"][1]["fc1.weight"])  # fresh per step
    for n in TARGETS:
        assert torch.equal(r0["masks"][n], r1["masks"][n]) and torch.equal(r0["w"][n], r1["w"][n])
        assert torch.equal(r0["samples"][-1][n], r0["masks"][n])  # steps 6, 7: hard masks
    kept = sum(int(m.sum()) for m in r0["masks"].values())
    assert kept == round(0.2 * sum(m.numel() for m in r0["masks"].values()))


@pytest.mark.slow
def test_compiled_and_eager_training_are_bit_identical():
    finals = {}
    for kind in ("eager", "compiled"):
        L.seed_everything(0)
        model = TinyNet()
        cb = SparsityCallback(StochasticAnnealing(0.8, end=10, probabilities="random"), kernel=kind)
        trainer(max_epochs=2, callbacks=[cb]).fit(model, random_loader())
        finals[kind] = model.state_dict()
        assert cb.sampler.uses_compile(torch.device("cpu")) == (kind == "compiled")
    for name, value in finals["eager"].items():
        assert torch.equal(value, finals["compiled"][name]), name


def test_weights_from_yields_to_a_resumed_checkpoint(tmp_path):
    torch.save(TinyNet().state_dict(), tmp_path / "other.pt")
    t = trainer(max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True)
    source = TinyNet()
    t.fit(source, random_loader())
    resumed = TinyNet()
    trainer(max_epochs=1, callbacks=[WeightsFrom(tmp_path / "other.pt")]).fit(
        resumed, random_loader(), ckpt_path=tmp_path / "last.ckpt"
    )  # already at max_epochs: nothing trains
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="weights_from='nowhere.ckpt': no such file"):
        WeightsFrom("nowhere.ckpt")


@pytest.mark.slow
def test_torch_compiled_module():
    """The swapped tensors are graph inputs of a compiled LightningModule; ~20 s of compilation."""
    L.seed_everything(0)
    cb = SparsityCallback(StochasticAnnealing(0.8, end=6))
    probe = Probe(cb)
    trainer(max_epochs=1, callbacks=[cb, probe]).fit(torch.compile(TinyNet()), random_loader())
    for step in range(6):
        kept = probe.seen[step]["fc1.weight"] != 0
        assert kept[cb.masks["fc1.weight"]].all() and not kept.all()
    assert cb.sparsity_report().global_sparsity == pytest.approx(0.8, abs=0.01)
