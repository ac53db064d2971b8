"""UpdateSchedule, Budget and the validation module: one rule and one message for every method."""

import math

import pytest

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core.budgets import Budget
from sparsetrain.core.schedules import UpdateSchedule, resolve_step
from sparsetrain.methods import GMP, SET, GraNet, RigL, Static, StochasticAnnealing


def updates(schedule, total):
    return [t for t in range(total + 1) if schedule.is_update_step(t)]


def test_grid_lands_on_end_and_never_fires_at_fit_start():
    assert updates(UpdateSchedule(0, 10, 4), 20) == [4, 8, 10]
    assert updates(UpdateSchedule(0, 10, 4, land_on_end=False), 20) == [4, 8]
    assert updates(UpdateSchedule(3, 3, 5), 20) == [3]  # one-shot at start
    assert updates(UpdateSchedule(0, 0, 5), 20) == []  # everything happens at fit start (init_masks)
    assert updates(UpdateSchedule(2, 9, None), 20) == [2, 9]  # only start and end
    assert updates(UpdateSchedule(0, 9, None), 20) == [9]


def test_resolve_fractions_once_against_optimizer_steps():
    s = UpdateSchedule(0.1, 0.75, 0.05).resolve(1000)
    assert (s.start, s.end, s.every, s.total_steps) == (100, 750, 50, 1000)
    assert s.next_update(0) == 100 and s.next_update(100) == 150 and s.next_update(749) == 750
    assert s.next_update(750) is None
    assert s.progress(100) == 0.0 and s.progress(425) == 0.5 and s.progress(750) == 1.0 and s.progress(5000) == 1.0
    assert UpdateSchedule(0, 0.5, 0.001).resolve(100).every == 1  # a fraction below one step is one step


def test_unknown_length_fails_for_fractions_and_works_for_ints():
    with pytest.raises(SparsityConfigError, match="end=0.75 is a fraction of training, but the length of training is unknown.*give end as an int"):
        UpdateSchedule(0, 0.75, 10).resolve(None)
    assert updates(UpdateSchedule(0, 12, 4).resolve(None), 20) == [4, 8, 12]


def test_end_beyond_the_run_warns_the_same_in_every_method():
    for method in (GMP(end=200), RigL(end=200), SET(end=200), GraNet(end=200), StochasticAnnealing(0.5, end=200)):
        with pytest.warns(UserWarning, match=r"end=200 is step 200, beyond the 100 optimizer steps of this fit"):
            method.setup(100)


def test_every_longer_than_the_run_warns_that_no_update_fires():
    with pytest.warns(UserWarning, match=r"every=100.*no update fires in the 50 optimizer steps"):
        RigL(every=100, end=0.75).setup(50)


@pytest.mark.parametrize("make", [lambda: GMP(every=0), lambda: RigL(every=0), lambda: SET(every=0), lambda: GraNet(every=0)])
def test_every_zero_is_an_error_everywhere(make):
    with pytest.raises(SparsityConfigError, match=r"every=0 must be >= 1 \(an int counts optimizer steps\)"):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GMP(power=float("nan")), r"power=nan must be a finite number \(ERK exponent"),
        (lambda: RigL(power="1"), r"power='1' must be a finite number"),
        (lambda: SparsityCallback(GMP(), seed="abc"), r"seed='abc' must be an int >= 0"),
        (lambda: SparsityCallback(GMP(), on_config_change="ignore"), r"on_config_change='ignore' is unknown; allowed: error, continue"),
        (lambda: SparsityCallback(GMP(), finalize="yes"), r"finalize='yes' is unknown; allowed: warn, prune"),
        (lambda: GMP(overrides={"fc2.weight": 1.5}), r"overrides\['fc2.weight'\]=1.5 must be a number in \[0, 1\)"),
        (lambda: GMP(overrides=["fc2.weight"]), r"overrides=\['fc2.weight'\] must be a mapping"),
        (lambda: GMP(start=0.5, end=float("nan")), r"end=nan must be an int"),
        (lambda: GMP(schedule="exp"), r"schedule='exp' is unknown; allowed: constant, linear, cubic"),
        (lambda: GraNet(initial_density=0), r"initial_density=0 must be a number in \(0, 1\]"),
        (lambda: RigL(drop_fraction=True), r"drop_fraction=True must be a finite number in \(0, 1\]"),
        (lambda: RigL(start=-3), r"start=-3 must be >= 0"),
    ],
)
def test_messages_name_the_key_the_value_and_what_is_allowed(make, match):
    with pytest.raises(SparsityConfigError, match=match):
        make()


def test_budget_checks_at_construction_and_on_shapes():
    with pytest.raises(SparsityConfigError, match="distribution='global' is unknown; allowed: uniform, erk, er"):
        Static(distribution="global")
    shapes = {"a.weight": (10, 10), "b.weight": (1000, 10)}
    Budget("uniform", overrides={"a.*": 0.5}).check(shapes, 0.5, 0.9)
    with pytest.raises(SparsityConfigError, match="cannot hold|does not fit"):
        Budget("uniform", overrides={"b.*": 0.99}).check(shapes, 0.1)
    with pytest.raises(SparsityConfigError, match="do not fit a global sparsity=0.1"):
        Budget("global", overrides={"b.*": 0.99}).check(shapes, 0.1)


def test_hparams_are_the_arguments_under_the_names_the_user_wrote():
    assert GMP(0.8, start=2, end=0.5, every=3, overrides={"x": 0.5}).hparams() == dict(
        sparsity=0.8, initial_sparsity=0.0, start=2, end=0.5, every=3, distribution="uniform",
        schedule="cubic", power=1.0, overrides={"x": 0.5}, overrides_mode="exact", structure=None,
        structure_schedule="final", indivisible="dense",
    )
    assert GraNet(regrowth_end=0.9).hparams()["regrowth_end"] == 0.9
    assert repr(RigL(0.9, every=10)).startswith("RigL(sparsity=0.9, distribution='erk', every=10, drop_fraction=0.3, end=0.75")


def test_resolve_step_message_names_the_key():
    with pytest.raises(SparsityConfigError, match="give every as an int") as err:
        resolve_step(0.5, None, "every")
    assert "{key}" not in str(err.value)
    assert math.isclose(resolve_step(0.25, 10, "end"), 2)  # 2.5 rounds to the even 2, as round() does
