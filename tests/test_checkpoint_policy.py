"""When a trial saves its training state (steps, fraction of the planned run, wall clock) and where the convergence
curve is evaluated, for the paper's sweeps at their published split sizes."""

from __future__ import annotations

import pytest

from bench.schema import DATASETS, evaluation_steps
from bench.sweeps import SWEEPS, build_sweep
from trainables.finetune import CheckpointPolicy, RunPlan


def test_step_based_schedule_takes_the_smaller_interval_and_never_the_final_step():
    assert CheckpointPolicy(every_steps=500).schedule(1200) == [500, 1000]
    assert CheckpointPolicy(every_steps=500).schedule(1000) == [
        500
    ]  # not after the final step: the result follows
    assert CheckpointPolicy(every_steps=500).schedule(399) == []  # the old behaviour of a paper DP trial
    assert CheckpointPolicy(every_steps=500, every_fraction=0.25).schedule(399) == [99, 198, 297, 396]
    assert CheckpointPolicy(every_steps=500, every_fraction=0.25).schedule(96) == [24, 48, 72]
    assert CheckpointPolicy(every_steps=50, every_fraction=0.25).schedule(400) == list(range(50, 400, 50))
    assert (
        CheckpointPolicy(every_steps=500, every_fraction=0.29).step_interval(100) == 29
    )  # not 28 (0.29 * 100 = 28.999...)
    assert CheckpointPolicy(every_steps=500, every_fraction=0.25).schedule(2) == [1]
    assert CheckpointPolicy(every_steps=500, every_fraction=0.25).schedule(1) == []
    assert CheckpointPolicy(every_steps=500, every_fraction=1.0).schedule(300) == []


def test_due_by_steps_or_by_time_whichever_comes_first():
    policy = CheckpointPolicy(every_steps=500, every_fraction=0.25, every_minutes=30)
    assert policy.due(24, planned_steps=96, seconds_since_save=0.0)
    assert not policy.due(25, planned_steps=96, seconds_since_save=1799.9)
    assert policy.due(25, planned_steps=96, seconds_since_save=1800.0)
    assert not policy.due(96, planned_steps=96, seconds_since_save=1e9)  # never after the final step
    assert not policy.due(0, planned_steps=96, seconds_since_save=1e9)
    assert not CheckpointPolicy(every_steps=500).due(
        25, planned_steps=96, seconds_since_save=1e9
    )  # no time limit set


@pytest.mark.parametrize(
    "bad",
    [
        dict(every_steps=0),
        dict(every_steps=5, every_fraction=0.0),
        dict(every_steps=5, every_fraction=1.5),
        dict(every_steps=5, every_minutes=0.0),
    ],
)
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError, match="invalid checkpoint policy"):
        CheckpointPolicy(**bad)


def paper_trials():
    for name in SWEEPS:
        for config in build_sweep(name):
            yield name, config, config.planned_steps(DATASETS[config.data.dataset].train_images)


def test_every_paper_trial_gets_a_mid_run_checkpoint_without_the_wall_clock():
    """Paper DP trials plan 96-399 steps: with checkpoints every 500 steps only, a preempted k=128 trial (7-14
    GPU-hours) restarted from step 0. The step-based schedule alone (the wall clock may never fire on a fast GPU)
    must save strictly inside every run of at least two steps."""
    checked, without = 0, []
    for name, config, planned in paper_trials():
        if planned < 2:
            continue
        r = config.resources
        schedule = CheckpointPolicy(
            every_steps=r.checkpoint_every_steps, every_fraction=r.checkpoint_every_fraction
        ).schedule(planned)
        checked += 1
        if not [step for step in schedule if 0 < step < planned]:
            without.append(f"{name}: {config.label} ({planned} steps)")
    assert checked > 100 and not without, without


def test_every_convergence_curve_has_at_least_six_points():
    """The convergence sweep's runs plan 96-937 steps: evaluating every 500 steps gave 1-2 points per curve."""
    curves = [(c, planned) for name, c, planned in paper_trials() if name == "convergence"]
    assert len(curves) == 6
    for config, planned in curves:
        e = config.evaluation
        points = evaluation_steps(planned, every=e.convergence_every_steps, points=e.convergence_points)
        assert len(points) >= 6 and points[-1] == planned and all(0 < s <= planned for s in points), (
            config.label,
            points,
        )


def test_evaluation_steps_are_evenly_spaced_and_end_at_the_final_step():
    assert evaluation_steps(96, points=8) == [12, 24, 36, 48, 60, 72, 84, 96]
    assert evaluation_steps(10, points=3) == [4, 7, 10]
    assert evaluation_steps(3, points=8) == [1, 2, 3]
    assert evaluation_steps(10, every=4) == [4, 8, 10]
    assert evaluation_steps(10) == [10]
    assert RunPlan(planned_steps=10, evaluation_steps=(4, 7)).evaluation_points() == {
        4,
        7,
        10,
    }  # and always the final step
    with pytest.raises(ValueError, match="must lie in 1..96"):
        RunPlan(planned_steps=96, evaluation_steps=(0, 12))


def test_the_smoke_convergence_sweep_still_evaluates_during_training():
    smoke = build_sweep("convergence", smoke=True)
    assert smoke and all(
        c.evaluation.convergence_every_steps == 3 and not c.evaluation.convergence_points for c in smoke
    )
