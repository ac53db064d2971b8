"""Lottery tickets (IMP with rewinding): pruning counts, exact rewinding, controls, resume, errors.

Real Trainers on LeNet-300-100 and the bundled digits (2 epochs of 20 steps per level)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.apps.lottery import Lottery, _LevelStart, lottery_from_config
from sparsetrain.apps.train import config_dir
from sparsetrain.core.imp import imp_masks, level_keep
from sparsetrain.methods import FixedMasks

P = 0.3
BASE = ["model=lenet300_100", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", f"lottery.prune_fraction={P}", "lottery.rewind=7",
        "+callbacks.probe._target_=tests.test_lottery.StartProbe"]


class StartProbe(pl.Callback):
    """Saves the weights at train start (after rewinding and masking) and logs every fit to fits.log."""

    def on_train_start(self, trainer, pl_module):
        folder = Path(trainer.default_root_dir)
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, folder / "start.pt")
        with open(folder.parent / "fits.log", "a") as fh:
            fh.write(f"{folder.name} {trainer.global_step}\n")


class Kill(pl.Callback):
    """Stands in for a killed job: raises in level ``level`` after optimizer step ``step``."""

    def __init__(self, level: str, step: int):
        self.level, self.step = level, step

    def on_train_batch_end(self, trainer, *args):
        if Path(trainer.default_root_dir).name == self.level and trainer.global_step == self.step:
            raise RuntimeError("killed")


def lottery(folder: Path, overrides=()) -> Lottery:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return lottery_from_config(compose("lottery", overrides=[f"lottery.dir={folder}", *BASE, *overrides]))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def fits(folder: Path) -> list[str]:
    log = folder / "fits.log"
    return log.read_text().split("\n")[:-1] if log.exists() else []


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lth")
    lot = lottery(folder, ["lottery.levels=3"])
    return folder, lot, lot.run()


# --------------------------------------------------------------------- pruning counts


@pytest.mark.parametrize("pruning, layer_fractions", [("global", None), ("layerwise", None),
                                                      ("global", {"c.weight": 0.1, "a.*": 0.0})])
def test_density_is_closed_form_within_one_weight_per_layer(pruning, layer_fractions):
    g = torch.Generator().manual_seed(0)
    weights = {"a.weight": torch.randn(37, 11, generator=g), "b.weight": torch.randn(8, 4, 3, 3, generator=g),
               "c.weight": torch.randn(10, 29, generator=g)}
    masks = None
    for level in range(1, 19):
        new = imp_masks(weights, masks, level, 0.2, pruning, layer_fractions)
        if masks is not None:
            assert all(not (new[n] & ~masks[n]).any() for n in new)  # survivors only shrink
        counts = {n: int(m.sum()) for n, m in new.items()}
        if pruning == "layerwise":
            for n, w in weights.items():
                assert abs(counts[n] - w.numel() * 0.8**level) <= 0.5
        elif layer_fractions:
            assert counts["a.weight"] == weights["a.weight"].numel()  # fraction 0: dense
            assert counts["c.weight"] == level_keep(weights["c.weight"].numel(), 0.1, level)
            assert counts["b.weight"] == level_keep(weights["b.weight"].numel(), 0.2, level)
        else:
            total = sum(w.numel() for w in weights.values())
            assert abs(sum(counts.values()) - total * 0.8**level) <= 0.5
        masks = new
        weights = {n: (w + 0.3 * torch.randn(w.shape, generator=g)) * new[n] for n, w in weights.items()}  # "retrain"


# ------------------------------------------------------------------- the main run


def test_levels_rewind_to_step_k_exactly(main_run):
    folder, _, results = main_run
    rewind = load(folder / "rewind.ckpt")
    assert rewind["global_step"] == 7 and rewind["callbacks"] == {}
    targets = list(load(folder / "level_00" / "masks.pt"))
    assert targets == ["net.net.1.weight", "net.net.3.weight", "net.net.5.weight"]
    total = sum(rewind["state_dict"][n].numel() for n in targets)
    for level in (1, 2, 3):
        d = folder / f"level_{level:02d}"
        masks, start, final = load(d / "masks.pt"), load(d / "start.pt"), load(d / "final.ckpt")["state_dict"]
        assert sum(int(m.sum()) for m in masks.values()) == level_keep(total, P, level)
        assert abs(sum(int(m.sum()) for m in masks.values()) - total * (1 - P) ** level) <= 0.5
        for name, value in rewind["state_dict"].items():
            if name in masks:
                assert torch.equal(start[name][masks[name]], value[masks[name]])  # survivors: step-k values
                assert (start[name][~masks[name]] == 0).all() and (final[name][~masks[name]] == 0).all()
            else:
                assert torch.equal(start[name], value)  # biases rewound too
        result = json.loads((d / "result.json").read_text())
        assert result["density"] == pytest.approx((1 - P) ** level, abs=1 / total)
        assert result["steps"] == 40 and result["test_acc"] > 0.5
        assert {"sparsity.json", "sparsity.txt", "final.ckpt", "csv"} <= {p.name for p in d.iterdir()}
    assert [r["level"] for r in results] == [0, 1, 2, 3]
    assert (folder / "summary.md").read_text().count("| weight |") == 4
    assert (folder / "accuracy_vs_density.png").stat().st_size > 0


def test_rewind_point_continues_the_dense_run_bit_exactly(main_run, tmp_path):
    """Weights, optimizer, LR schedule and the data position (mid-epoch, step 7) all come back."""
    folder, lot, _ = main_run
    pl.seed_everything(0)
    datamodule = lot.make_datamodule()
    module = lot.make_module(datamodule)
    sparsity = SparsityCallback(FixedMasks(load(folder / "level_00" / "masks.pt")))
    trainer = lot.make_trainer(tmp_path, [_LevelStart(sparsity, None, True), sparsity])
    trainer.fit(module, datamodule=datamodule, ckpt_path=folder / "rewind.ckpt", weights_only=False)
    dense = load(folder / "level_00" / "final.ckpt")["state_dict"]
    assert all(torch.equal(dense[k], v) for k, v in module.state_dict().items())


def test_controls_reinit_and_random_mask(main_run):
    folder, _, _ = main_run
    for control in ("reinit", "random_mask"):
        lottery(folder, ["lottery.levels=2", f"lottery.control={control}"]).run()
    rewind = load(folder / "rewind.ckpt")["state_dict"]
    for level in (1, 2):
        main = load(folder / f"level_{level:02d}" / "masks.pt")
        reinit = folder / "control_reinit" / f"level_{level:02d}"
        assert all(torch.equal(m, load(reinit / "masks.pt")[n]) for n, m in main.items())
        start, level0 = load(reinit / "start.pt"), load(folder / "level_00" / "start.pt")
        for n, m in main.items():
            assert (start[n][~m] == 0).all()
            assert not torch.equal(start[n][m], rewind[n][m]) and not torch.equal(start[n][m], level0[n][m])
        random = load(folder / "control_random_mask" / f"level_{level:02d}" / "masks.pt")
        assert {n: int(m.sum()) for n, m in random.items()} == {n: int(m.sum()) for n, m in main.items()}
        assert not all(torch.equal(random[n], m) for n, m in main.items())
    summary = (folder / "summary.csv").read_text()
    assert summary.count("reinit,") == 2 and summary.count("random_mask,") == 2 and summary.count("weight,") == 4


def test_learning_rate_rewinding_keeps_trained_weights(tmp_path):
    lottery(tmp_path, ["lottery.levels=1", "lottery.mode=lr"]).run()
    masks, start = load(tmp_path / "level_01" / "masks.pt"), load(tmp_path / "level_01" / "start.pt")
    trained = load(tmp_path / "level_00" / "final.ckpt")["state_dict"]
    for n, value in trained.items():
        assert torch.equal(start[n], value * masks[n]) if n in masks else torch.equal(start[n], value)
    assert load(tmp_path / "rewind.ckpt")["global_step"] == json.loads((tmp_path / "level_01" / "result.json").read_text())["steps"] - 33


# ----------------------------------------------------------------------------- resume


def test_resume_after_kill_continues_at_the_level(main_run, tmp_path):
    straight, _, _ = main_run
    with pytest.raises(RuntimeError, match="killed"):  # killed in level 2 after step 30 (its last.ckpt is from step 20)
        lottery(tmp_path, ["lottery.levels=2", "+callbacks.kill._target_=tests.test_lottery.Kill",
                           "+callbacks.kill.level=level_02", "+callbacks.kill.step=30"]).run()
    assert fits(tmp_path) == ["level_00 0", "level_01 7", "level_02 7"]
    done = {lv: (tmp_path / lv / "result.json").stat().st_mtime_ns for lv in ("level_00", "level_01")}
    lottery(tmp_path, ["lottery.levels=2"]).run()
    assert fits(tmp_path)[3:] == ["level_02 20"]  # only level 2 ran again, from its end-of-epoch checkpoint
    assert done == {lv: (tmp_path / lv / "result.json").stat().st_mtime_ns for lv in done}
    a, b = (load(f / "level_02" / "final.ckpt")["state_dict"] for f in (straight, tmp_path))
    assert all(torch.equal(a[k], v) for k, v in b.items())  # same as the run that was never killed

    (tmp_path / "level_02" / "result.json").unlink()  # a level without its done-marker restarts from the rewind point
    lottery(tmp_path, ["lottery.levels=2"]).run()
    assert fits(tmp_path)[4:] == ["level_02 7"]
    assert all(torch.equal(a[k], v) for k, v in load(tmp_path / "level_02" / "final.ckpt")["state_dict"].items())


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("override, message", [
    ("lottery.prune_fraction=1.5", "lottery.prune_fraction=1.5 must be a number in (0, 1)"),
    ("lottery.prune_fraction=0", "lottery.prune_fraction=0 must be a number in (0, 1)"),
    ("lottery.levels=0", "lottery.levels=0 must be an int >= 1"),
    ("lottery.rewind=-3", "lottery.rewind=-3 must be an int >= 0 (optimizer steps) or a float in [0, 1)"),
    ("lottery.rewind=1.5", "lottery.rewind=1.5 must be an int >= 0"),
    ("lottery.mode=late", "lottery.mode='late' is unknown; allowed: weight, lr"),
    ("lottery.control=shuffle", "lottery.control='shuffle' is unknown; allowed: none, reinit, random_mask"),
    ("lottery.pruning=local", "lottery.pruning='local' is unknown; allowed: global, layerwise"),
])
def test_bad_input_fails_with_a_clear_message(tmp_path, override, message):
    with pytest.raises(SparsityConfigError) as err:
        lottery(tmp_path, [override])
    assert message in str(err.value)


def test_errors_found_at_start(tmp_path):
    with pytest.raises(SparsityConfigError, match=r"lottery.rewind=1000 is step 1000, but training has only 40 "
                                                  r"optimizer steps; allowed: an int in \[0, 40\)"):
        lottery(tmp_path / "a", ["lottery.rewind=1000"]).run()
    with pytest.raises(SparsityConfigError, match="lottery.control=reinit needs the masks of the main run"):
        lottery(tmp_path / "b", ["lottery.control=reinit"]).run()
    with pytest.raises(SparsityConfigError, match=r"lottery.layer_fractions glob 'head\*' matches no target"):
        lottery(tmp_path / "c", ["lottery.layer_fractions={head*:0.1}"]).run()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "lottery.json").write_text(json.dumps({**lottery(tmp_path / "d").params, "pruning": "layerwise"}))
    with pytest.raises(SparsityConfigError, match="different settings: pruning: was 'layerwise', now 'global'"):
        lottery(tmp_path / "d").run()
    (tmp_path / "d" / "lottery.json").write_text(json.dumps({**lottery(tmp_path / "d").params, "module.lr": 0.5}))
    with pytest.raises(SparsityConfigError, match="different settings: module.lr: was 0.5, now 0.1"):
        lottery(tmp_path / "d", ["lottery.control=reinit"]).run()  # a control must match its main run


def test_fixed_masks_must_match_targets():
    from sparsetrain.methods.base import SparsityContext

    method = FixedMasks({"w": torch.ones(3, dtype=torch.bool)})
    ctx = SparsityContext({"v": torch.zeros(3)}, None, 10, torch.Generator())
    with pytest.raises(SparsityConfigError, match="FixedMasks has masks for"):
        method.init_masks(ctx)
    assert repr(method) == "FixedMasks(density=1.0000, layers=1)"


def test_math_of_level_keep():
    assert level_keep(1000, 0.2, 0) == 1000 and level_keep(1000, 0.2, 1) == 800
    assert level_keep(10, 0.5, 1) == 5 and level_keep(3, 0.5, 1) == 2  # half rounds up
    assert level_keep(50000, 0.2, 18) == math.floor(50000 * 0.8**18 + 0.5)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("lth_*.yaml")))
def test_lottery_experiments_compose(experiment):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("lottery", overrides=[f"experiment={experiment}"])
    lot = lottery_from_config(cfg)
    assert lot.params["prune_fraction"] == 0.2 and lot.levels >= 10 and cfg.lottery.name == experiment
    assert cfg.lottery.dir == f"outputs/lottery/{experiment}/weight_p0.2_{cfg.lottery.pruning}_rw{cfg.lottery.rewind}_seed0"


# ------------------------------------------------------------------------ the app's output


def lottery_cfg(folder: Path, overrides=()):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("lottery", overrides=[f"lottery.dir={folder}", *BASE, *overrides])


def test_app_ends_with_the_level_table(main_run, caplog):
    import logging

    from sparsetrain.apps.lottery import run_lottery

    folder, _, _ = main_run
    before = fits(folder)
    with caplog.at_level(logging.INFO, logger="sparsetrain.apps.lottery"):
        results = run_lottery(lottery_cfg(folder, ["lottery.levels=3"]))  # every level done: nothing trains
    assert fits(folder) == before and [r["level"] for r in results] == [0, 1, 2, 3]
    messages = [r.getMessage() for r in caplog.records if r.name == "sparsetrain.apps.lottery"]
    assert sum("weight level" in m and "done before" in m for m in messages) == 4
    assert messages[-1].count("| weight |") == 4 and "| run | level | target_density |" in messages[-1]
    assert messages[-1].endswith((folder / "summary.md").read_text().rstrip())


def test_app_levels_are_quiet_unless_verbose(tmp_path, capfd, caplog):
    import logging

    from sparsetrain.apps.lottery import LIGHTNING_INFO, run_lottery

    levels = {name: logging.getLogger(name).level for name in LIGHTNING_INFO}
    with caplog.at_level(logging.INFO, logger="sparsetrain.apps.lottery"):
        run_lottery(lottery_cfg(tmp_path, ["lottery.levels=1", "trainer.max_epochs=1", "trainer.enable_model_summary=true"]))
    out, err = capfd.readouterr()
    assert "Seed set to" not in out + err and "GPU available" not in out + err
    assert (out + err).count("Trainable params") == 1  # the model summary of level 0 only
    assert {name: logging.getLogger(name).level for name in LIGHTNING_INFO} == levels  # restored
    lines = [r.getMessage() for r in caplog.records if "level 0" in r.getMessage()]
    assert lines[0].startswith("weight level 00/01: density 100.00 %, test_acc ") and "20 steps" in lines[0]
    assert lines[1].startswith("weight level 01/01: density 70.00 %")


def test_a_run_rejected_at_start_does_not_claim_its_folder(tmp_path):
    with pytest.raises(SparsityConfigError, match="lottery.rewind=1000"):
        lottery(tmp_path / "a", ["lottery.rewind=1000"]).run()  # rejected at level 0's fit start
    with pytest.raises(SparsityConfigError, match="matches no target"):
        lottery(tmp_path / "c", ["lottery.layer_fractions={head*:0.1}"]).run()  # rejected before any level
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    lottery(tmp_path / "a", ["lottery.levels=1"]).run()  # the same folder, now with valid settings
    assert (tmp_path / "a" / "level_01" / "result.json").is_file()


def test_levels_with_a_structure_end_n_m(tmp_path):
    from sparsetrain.core.nm import NMStructure

    lottery(tmp_path, ["lottery.levels=2", "lottery.structure=2:4"]).run()  # density 0.7, then 0.49 -> 2:4
    s = NMStructure(2, 4)
    level_1, level_2 = (load(tmp_path / f"level_0{i}" / "masks.pt") for i in (1, 2))
    assert all((s.group_counts(m) >= 2).all() for m in level_1.values())
    assert not all(s.holds(m) for m in level_1.values())
    assert all(s.holds(m) for m in level_2.values())
    final = load(tmp_path / "level_02" / "final.ckpt")["state_dict"]
    assert all((s.group_counts(final[n] != 0) <= 2).all() for n in level_2)
    assert json.loads((tmp_path / "lottery.json").read_text())["structure"] == "2:4"
