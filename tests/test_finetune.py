"""The fine-tuning loop: token views, scale weights, prior preservation, and DP/non-DP runs on real offline data."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from conftest import TINY_VAR, TINY_VQVAE

from bench.schema import (
    ConfigError,
    EvaluationConfig,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
)
from trainables.data import offline
from trainables.data.tokens import TokenViews
from trainables.finetune import (
    Checkpointing,
    OutOfGpuMemory,
    Prior,
    RunPlan,
    TrainingDiverged,
    finetune,
    training_autocast,
)
from trainables.methods import adapt, trainable_parameters
from trainables.models import build_var, build_vqvae
from trainables.pretrain import Schedule, encode_tokens, token_nll, train_vqvae
from trainables.prior import build_prior_bank, prior_preservation_loss
from trainables.privacy import PrivacyConfigError
from trainables.profiling import StepMeter
from trainables.training import average_gradients, scale_loss_weights, view_losses

FULL = MethodConfig(name="full")
GREEDY = EvaluationConfig(
    extractor="substitute-randconv-v1", guidance_scale=1.0, top_k=0, top_p=0.0
)  # bank sampling settings


def resources(**checkpoint_fields) -> ResourcesConfig:
    """The trial config's resources section with checkpoint settings (``every_steps``, ``every_minutes``, ``every_fraction``)."""
    return ResourcesConfig(**{f"checkpoint_{name}": value for name, value in checkpoint_fields.items()})


def optimization(steps: int, **fields) -> OptimizationConfig:
    """The trial config's optimisation section for a run of ``steps`` steps (float32 on CPU whatever autocast says)."""
    return OptimizationConfig(steps=steps, **fields)


@pytest.fixture(scope="module")
def digits_setup():
    """A tiny VQVAE trained briefly on digits, and digits tokens with 2 views (the image and its 1-pixel shift)."""
    train = offline.digits(split="train", image_size=16, seed=0)
    test = offline.digits(split="test", image_size=16, seed=0)
    torch.manual_seed(0)
    vqvae = build_vqvae(**TINY_VQVAE)
    train_vqvae(
        vqvae,
        train.images_N3HW,
        schedule=Schedule(steps=60, batch_size=32, lr=1e-3, weight_decay=0.0, log_every=60),
    )
    shifted = torch.roll(train.images_N3HW, shifts=1, dims=3)
    views = tuple(
        torch.stack([a, b], dim=1)
        for a, b in zip(encode_tokens(vqvae, train.images_N3HW), encode_tokens(vqvae, shifted))
    )
    data = TokenViews(train.labels_N, views)
    held_out = (encode_tokens(vqvae, test.images_N3HW), test.labels_N)
    return vqvae, data, held_out, len(train.class_names)


def base_var() -> torch.nn.Module:
    return build_var(**TINY_VAR, drop_path_rate=0.0, generator=torch.Generator().manual_seed(0))


def test_token_views_take_distinct_views_and_validate():
    labels = torch.arange(5)
    views = (torch.arange(5 * 3).view(5, 3, 1), torch.arange(5 * 3 * 4).view(5, 3, 4))
    data = TokenViews(labels, views)
    label_b, idx = data.take(torch.tensor([4, 0]), k=3, generator=torch.Generator().manual_seed(0))
    assert label_b.tolist() == [4, 0] and idx[0].shape == (2, 3, 1) and idx[1].shape == (2, 3, 4)
    assert sorted(idx[0][0].flatten().tolist()) == [12, 13, 14]  # all three views of example 4, each once
    with pytest.raises(ValueError, match="k=4 needs k distinct cached views"):
        data.take(torch.tensor([0]), k=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="not \\[N=5"):
        TokenViews(labels, (torch.zeros(4, 3, 1),))


def test_scale_weights():
    patch_nums = (1, 2, 3)
    assert torch.equal(scale_loss_weights(patch_nums, decay=1.0), torch.ones(14))
    weights_L = scale_loss_weights(patch_nums, decay=0.5)
    assert weights_L.mean().item() == pytest.approx(1.0) and weights_L[0] == 4 * weights_L[-1]


def test_view_losses_weighting_and_class_dropout_once_per_example(tiny_vqvae):
    var = base_var().train()
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, 64, (3, 4, pn * pn), generator=g) for pn in TINY_VAR["patch_nums"]]
    labels = torch.tensor([0, 1, 2])
    plain_bk = view_losses(var, tiny_vqvae, labels, idx, class_dropout=0.0)
    ones = view_losses(
        var,
        tiny_vqvae,
        labels,
        idx,
        class_dropout=0.0,
        token_weights_L=scale_loss_weights(TINY_VAR["patch_nums"]),
    )
    assert plain_bk.shape == (3, 4) and torch.allclose(plain_bk, ones)
    # With dropout 0.999 nearly every example is unconditional, and its k views share the decision: rows of equal
    # views give equal losses only if all views of an example saw the same label.
    same_views = [t[:, :1].expand(-1, 4, -1) for t in idx]
    dropped_bk = view_losses(
        var, tiny_vqvae, labels, same_views, class_dropout=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(dropped_bk, dropped_bk[:, :1].expand(-1, 4))


def test_prior_loss_is_zero_for_the_teacher_and_trains_only_the_student(tiny_vqvae):
    teacher = base_var().eval()
    bank = build_prior_bank(
        teacher,
        tiny_vqvae,
        num_samples=6,
        chunk_size=4,
        evaluation=GREEDY,
        generator=torch.Generator().manual_seed(0),
    )
    assert bank.size == 6 and [t.shape for t in bank.tokens] == [
        (6, pn * pn) for pn in TINY_VAR["patch_nums"]
    ]
    student = copy.deepcopy(teacher)
    adapt(student, FULL, num_classes=2, seed=0)
    student.eval()
    idx = bank.batch(4, generator=torch.Generator().manual_seed(1))
    assert prior_preservation_loss(student, teacher, tiny_vqvae, idx).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        student.head.weight.add_(
            torch.randn(student.head.weight.shape, generator=torch.Generator().manual_seed(2)), alpha=0.05
        )
    kl = prior_preservation_loss(student, teacher, tiny_vqvae, idx)
    assert kl.item() > 1e-4
    kl.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(student).values())


def test_prior_targets_are_deterministic_with_a_training_mode_teacher(tiny_vqvae):
    teacher = build_var(**TINY_VAR, drop_path_rate=0.3, generator=torch.Generator().manual_seed(0)).train()
    student = copy.deepcopy(teacher)
    adapt(student, FULL, num_classes=2, seed=0)
    student.eval()
    with torch.no_grad():
        student.head.weight.mul_(1.1)
    idx = [
        torch.randint(0, 64, (3, pn * pn), generator=torch.Generator().manual_seed(pn))
        for pn in TINY_VAR["patch_nums"]
    ]
    values = {prior_preservation_loss(student, teacher, tiny_vqvae, idx).item() for _ in range(3)}
    assert len(values) == 1 and teacher.training


def _ddp_finetune_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        params = _tiny_non_dp_finetune()
        if rank == 0:
            torch.save(params, result_file)
    finally:
        torch.distributed.destroy_process_group()


def _tiny_lora_setup():
    """(token views of 16 random examples, a tiny VQVAE, a LoRA-adapted tiny VAR), the same in every process."""
    g = torch.Generator().manual_seed(0)
    data = TokenViews(
        torch.randint(0, 3, (16,), generator=g),
        tuple(torch.randint(0, 64, (16, 1, pn * pn), generator=g) for pn in TINY_VAR["patch_nums"]),
    )
    torch.manual_seed(0)
    vqvae = build_vqvae(**TINY_VQVAE).eval()
    var = base_var()
    adapt(var, MethodConfig(name="lora", lora_rank=4), num_classes=3, seed=0)
    return data, vqvae, var


def _tiny_non_dp_finetune() -> dict[str, torch.Tensor]:
    data, vqvae, var = _tiny_lora_setup()
    finetune(
        var,
        vqvae,
        data,
        optimization=optimization(3, learning_rate=1e-2, batch_size=8, class_dropout=0.0),
        method=MethodConfig(name="lora", lora_rank=4),
        plan=RunPlan(planned_steps=3),
    )
    return {n: p.detach().clone() for n, p in trainable_parameters(var).items()}


@pytest.mark.parametrize("private", (False, True))
def test_training_time_leaves_out_evaluations_checkpoints_and_logs(private, monkeypatch):
    """Steps are timed as segments (``StepMeter``): whatever pauses training must end the segment first, or a trial's
    rows per second and MFU would count its evaluations, checkpoint writes, accounting and logs (a trial's log is a
    Ray report, which may wait for the controller's poll); a checkpoint holds the time so far. The clock is the
    test's: each reading advances it by 1 ms, and each pause by far more than all readings together."""
    clock = {"now": 0.0}

    def perf_counter() -> float:
        clock["now"] += 1e-3
        return clock["now"]

    def pause(seconds: float) -> None:
        clock["now"] += seconds

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    data, vqvae, var = _tiny_lora_setup()
    saved_seconds, paused = [], []

    def save(state: dict) -> None:
        saved_seconds.append(state["compute"]["train_seconds"])
        pause(100.0)

    out = finetune(
        var,
        vqvae,
        data,
        optimization=optimization(6, learning_rate=1e-3, batch_size=8),
        method=MethodConfig(name="lora", lora_rank=4),
        plan=RunPlan(planned_steps=6, evaluation_steps=(3, 6), log_every=1),
        privacy=PrivacyConfig(target_epsilon=8, sampling_rate=0.5, max_grad_norm=1.0) if private else None,
        debug_seed=0 if private else None,
        evaluate_fn=lambda model: paused.append("evaluation") or pause(100.0) or {},
        log=lambda entry: paused.append("log") or pause(100.0),
        checkpointing=Checkpointing(save=save, resources=resources(every_steps=2, every_fraction=1.0)),
    )
    trained = out["compute"]["train_seconds"]
    # saved after steps 2, 3 (an evaluation), 4 and the final step
    assert paused.count("log") == 6 and paused.count("evaluation") == 2
    assert len(saved_seconds) == 4
    assert 0 < trained < 1.0  # the readings inside training segments only: any pause would add 100 s
    assert 0 < saved_seconds[0] < saved_seconds[1] < saved_seconds[2] < trained
    assert saved_seconds[-1] <= trained


def test_non_dp_finetune_under_two_processes_matches_one(tmp_path):
    """Each rank trains on its half of every batch and gradients are averaged: the same update as one process."""
    single = _tiny_non_dp_finetune()
    torch.multiprocessing.spawn(
        _ddp_finetune_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "ddp.pt")),
        nprocs=2,
        join=True,
    )
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")  # noqa: B023


def _tiny_uneven_finetune(batch_size: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The trainable parameters and history of 3 logged non-DP steps on batches of ``batch_size``."""
    data, vqvae, var = _tiny_lora_setup()
    history: list[dict] = []
    finetune(
        var,
        vqvae,
        data,
        optimization=optimization(3, learning_rate=1e-2, batch_size=batch_size, class_dropout=0.0),
        method=MethodConfig(name="lora", lora_rank=4),
        plan=RunPlan(planned_steps=3, log_every=1),
        log=history.append,
    )
    return {n: p.detach().clone() for n, p in trainable_parameters(var).items()}, history


def _ddp_uneven_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.save(_tiny_uneven_finetune(5), f"{result_file}.{rank}")
        with pytest.raises(ConfigError, match="optimization.batch_size: 1 examples cannot be shared by 2"):
            _tiny_uneven_finetune(1)
    finally:
        torch.distributed.destroy_process_group()


def test_non_dp_ddp_with_a_batch_the_world_does_not_divide_matches_one_process(tmp_path):
    """A batch of 5 on 2 ranks is split 3 + 2: each rank's mean is weighted by its share, so the averaged gradient
    is the whole batch's mean (per-rank means averaged weighted the 2 examples as 3), and every rank logs the
    whole batch's loss, not its own shard's. A batch smaller than the world is refused before compute."""
    single, single_history = _tiny_uneven_finetune(5)
    torch.multiprocessing.spawn(
        _ddp_uneven_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "uneven")),
        nprocs=2,
        join=True,
    )
    for rank in (0, 1):
        params, history = torch.load(tmp_path / f"uneven.{rank}", weights_only=True)
        for name, value in single.items():
            torch.testing.assert_close(
                params[name], value, rtol=1e-4, atol=1e-5, msg=f"{name} on rank {rank}"
            )
        assert [e["loss"] for e in history] == pytest.approx([e["loss"] for e in single_history], rel=1e-5)


def _average_gradients_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        g = torch.Generator().manual_seed(rank)
        shapes = [((3,), torch.float32), ((700, 1024), torch.float32), ((16, 64), torch.float32)]
        shapes += [((5,), torch.bfloat16), ((2, 3), torch.float32)]
        params = [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape, dtype in shapes]
        for p in params[:-1]:  # the last has no gradient
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        params[2].grad = params[2].grad.T.contiguous().T  # a transposed (non-contiguous) small gradient
        expected = []
        for p in params[:-1]:  # one all-reduce per parameter, as before
            grad = p.grad.clone()
            torch.distributed.all_reduce(grad)
            expected.append(grad / world)
        calls, all_reduce = [], torch.distributed.all_reduce
        torch.distributed.all_reduce = lambda tensor, *a, **k: (
            calls.append(tensor.numel()) or all_reduce(tensor, *a, **k)
        )
        average_gradients(params, world)
        assert params[-1].grad is None
        assert all(torch.equal(p.grad, want) for p, want in zip(params, expected))
        # The large gradient in place; the small float32 ones (the transposed one too) and the bf16 one a flat copy each.
        assert sorted(calls) == [5, 3 + 16 * 64, 700 * 1024]
        torch.save(calls, f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_gradients_are_averaged_in_few_collectives_with_one_per_parameter_s_values(tmp_path):
    """Under DDP the small gradients go through one all-reduce per dtype (a collective per parameter cost its launch
    and round trip ~200 times a VAR-d16 step); every value equals a per-parameter all-reduce's, bit for bit."""
    torch.multiprocessing.spawn(
        _average_gradients_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "calls")),
        nprocs=2,
        join=True,
    )
    assert torch.load(tmp_path / "calls.0", weights_only=True) == torch.load(
        tmp_path / "calls.1", weights_only=True
    )


def test_non_dp_finetune_lowers_held_out_nll_with_every_option(digits_setup):
    vqvae, data, (test_tokens, test_labels), K = digits_setup
    teacher = base_var().eval()
    bank = build_prior_bank(
        teacher, vqvae, num_samples=16, evaluation=GREEDY, generator=torch.Generator().manual_seed(0)
    )
    # Full fine-tuning: on a randomly initialised base (blocks near identity) adapters alone cannot move the logits much.
    method = MethodConfig(name="full", scale_weight_decay=0.8, prior_weight=0.1)
    var = copy.deepcopy(teacher)
    adapt(var, method, num_classes=K, seed=0)
    before = token_nll(var, vqvae, test_tokens, test_labels)
    plan = RunPlan(planned_steps=40, evaluation_steps=(20, 40), prior_batch_size=4, log_every=20)
    evaluations = []

    def held_out_nll(model) -> dict:
        evaluations.append(model.training)
        return {"nll": token_nll(model, vqvae, test_tokens, test_labels)}

    out = finetune(
        var,
        vqvae,
        data,
        optimization=optimization(40, learning_rate=3e-3, batch_size=32),
        method=method,
        plan=plan,
        prior=Prior(teacher, bank),
        evaluate_fn=held_out_nll,
    )
    after = token_nll(var, vqvae, test_tokens, test_labels)
    assert [c["step"] for c in out["convergence"]] == [20, 40] and evaluations == [False, False]
    compute = out["compute"]  # without DP one view per example (k views are DP's augmentation multiplicity)
    assert compute["rows_trained"] == 40 * 32 and compute["train_flops_per_row"] > 0
    assert compute["train_pflops"] == pytest.approx(compute["train_flops_per_row"] * 40 * 32 / 1e15)
    assert out["convergence"][-1]["nll"] == pytest.approx(after) and out["convergence"][0]["nll"] < before
    print(f"held-out NLL {before:.3f} -> {after:.3f}")
    assert after < before - 0.2
    assert out["privacy"] is None and {"loss", "grad_norm", "prior_kl"} <= set(out["history"][-1])


def test_dp_finetune_records_ledger_and_no_private_statistics(digits_setup):
    vqvae, data, (test_tokens, test_labels), K = digits_setup
    teacher = base_var().eval()
    bank = build_prior_bank(
        teacher, vqvae, num_samples=8, evaluation=GREEDY, generator=torch.Generator().manual_seed(0)
    )
    results = {}
    method = MethodConfig(name="full", prior_weight=0.05)
    for epsilon in (1.0, 1e4):
        var = copy.deepcopy(teacher)
        adapt(var, method, num_classes=K, seed=0)
        privacy = PrivacyConfig(
            target_epsilon=epsilon,
            sampling_rate=0.05,
            max_grad_norm=0.5,
            augmentation_multiplicity=2,
        )
        out = finetune(
            var,
            vqvae,
            data,
            optimization=optimization(30, learning_rate=3e-3),
            method=method,
            privacy=privacy,
            resources=ResourcesConfig(rows_per_forward=32),
            plan=RunPlan(planned_steps=30, prior_batch_size=4, log_every=10),
            prior=Prior(teacher, bank),
            debug_seed=0,
        )
        ledger = out["privacy"]
        assert ledger["sampling_rng"].startswith("caller-seeded") and ledger["noise_rng"].startswith(
            "seeded from OS entropy"
        )
        assert (
            ledger["steps"] == 30
            and ledger["epsilon_rdp"] <= epsilon
            and ledger["augmentation_multiplicity"] == 2
        )
        assert ledger["delta"] == 1 / data.num_examples and "actual_batch_sizes" not in ledger
        # Compute at the expected batch (the actual Poisson sizes are private); the public prior term counted per step.
        compute = out["compute"]
        assert (
            compute["rows_trained"] == 30 * 2 * math.floor(0.05 * data.num_examples)
            and compute["steps_trained"] == 30
        )
        assert compute["train_flops_per_step"] > 0 and compute["train_pflops"] == pytest.approx(
            (compute["train_flops_per_row"] * compute["rows_trained"] + 30 * compute["train_flops_per_step"])
            / 1e15
        )
        assert any("scaled_dot_product" in op for op in compute["counted_ops"])
        for entry in out["history"]:
            assert not {"loss", "grad_norm", "batch_size"} & set(entry), (
                entry
            )  # nothing computed from private examples
            assert {"epsilon_rdp", "prior_kl"} <= set(entry)
        results[epsilon] = token_nll(var, vqvae, test_tokens, test_labels)
    print(f"held-out NLL: eps=1 {results[1.0]:.3f}, eps=1e4 {results[1e4]:.3f}")
    assert results[1e4] < results[1.0]


def test_bad_finetune_settings_fail_before_compute(digits_setup):
    vqvae, data, _, K = digits_setup
    var = base_var()
    adapt(var, FULL, num_classes=K, seed=0)
    one_step = dict(optimization=optimization(1), plan=RunPlan(planned_steps=1))
    with pytest.raises(ValueError, match="k=3 needs k distinct cached views"):
        finetune(
            var,
            vqvae,
            data,
            method=FULL,
            privacy=PrivacyConfig(
                target_epsilon=1, sampling_rate=0.1, max_grad_norm=1, augmentation_multiplicity=3
            ),
            **one_step,
        )
    with pytest.raises(ValueError, match="needs a Prior"):
        finetune(var, vqvae, data, method=MethodConfig(name="full", prior_weight=1.0), **one_step)
    with pytest.raises(
        PrivacyConfigError, match="allow_delta_at_least_inverse_n"
    ):  # delta >= 1/N: known only with the data
        finetune(
            var,
            vqvae,
            data,
            method=FULL,
            privacy=PrivacyConfig(target_epsilon=1, sampling_rate=0.1, max_grad_norm=1, delta=0.5),
            **one_step,
        )
    with pytest.raises(ValueError, match="evaluation steps"):
        RunPlan(planned_steps=4, evaluation_steps=(2, 5))


def _run_with_checkpoints(digits_setup, *, privacy, resume=None, states=None, debug_seed=None):
    vqvae, data, _, num_classes = digits_setup
    var = base_var()
    adapt(var, MethodConfig(name="lora"), num_classes=num_classes, seed=0)
    keep = (lambda state: states.append(copy.deepcopy(state))) if states is not None else (lambda state: None)
    out = finetune(
        var,
        vqvae,
        data,
        optimization=optimization(6, learning_rate=1e-3, batch_size=16, class_dropout=0.1, seed=3),
        method=MethodConfig(name="lora"),
        privacy=privacy,
        plan=RunPlan(planned_steps=6, log_every=1),
        debug_seed=debug_seed,
        checkpointing=Checkpointing(
            save=keep, resources=resources(every_steps=2, every_fraction=1.0), resume=resume
        ),
    )
    return trainable_parameters(var), out


def test_non_dp_resume_from_checkpoint_is_bit_identical(digits_setup):
    """Stop after a checkpoint, resume in a fresh model and optimiser: the same parameters and history as one
    uninterrupted run (every draw is keyed by the public seed and the step)."""
    states: list[dict] = []
    whole, whole_out = _run_with_checkpoints(digits_setup, privacy=None, states=states)
    assert [s["step"] for s in states] == [2, 4, 6]  # and the final state
    resumed, resumed_out = _run_with_checkpoints(digits_setup, privacy=None, resume=states[0])
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert len(resumed_out["history"]) == len(whole_out["history"]) == 6
    assert resumed_out["history"] == [
        {**e, "seconds": r["seconds"]} for e, r in zip(whole_out["history"], resumed_out["history"])
    ]


DP_RESUME = PrivacyConfig(
    target_epsilon=8.0,
    sampling_rate=0.02,
    max_grad_norm=1.0,
    augmentation_multiplicity=2,
)


def test_dp_checkpoint_does_not_predict_the_noise_of_a_resumed_run(digits_setup):
    """A DP checkpoint holds the accounting and no generator state: two runs resumed from it draw fresh noise,
    sampling and per-example draws (different adapters), and both account exactly the steps of one whole run."""
    states: list[dict] = []
    _, whole_out = _run_with_checkpoints(digits_setup, privacy=DP_RESUME, states=states)
    checkpoint = states[0]
    assert set(checkpoint["privacy"]) == {
        "spec",
        "noise_multiplier",
        "delta",
        "dataset_size",
        "planned_steps",
        "steps",
    }
    assert not [
        key
        for key, value in _leaves(checkpoint)
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8
    ]  # no RNG state
    first, first_out = _run_with_checkpoints(digits_setup, privacy=DP_RESUME, resume=checkpoint)
    second, second_out = _run_with_checkpoints(digits_setup, privacy=DP_RESUME, resume=checkpoint)
    assert all(not torch.equal(first[name], second[name]) for name in first)
    for out in (first_out, second_out):
        for key in ("epsilon_rdp", "epsilon_prv", "steps", "noise_multiplier"):
            assert out["privacy"][key] == whole_out["privacy"][key], key
        assert [e["step"] for e in out["history"]] == list(range(1, 7))


def test_a_dp_checkpoint_s_records_do_not_depend_on_the_poisson_batches(digits_setup):
    """Checkpoints are public. Two DP runs that draw different Poisson batches (other sampling seeds) save the same
    compute record and history, but for the wall-clock times and peak memory that ``RELEASED_WITHOUT_NOISE`` names:
    the FLOP counter's per-operator totals of the counting step, a private batch, once gave its size exactly."""
    records = []
    for seed in (1, 2):
        states: list[dict] = []
        _run_with_checkpoints(digits_setup, privacy=DP_RESUME, states=states, debug_seed=seed)
        records.append(states[0])
    side_channels = {"train_seconds", "peak_memory_bytes"}
    first, second = ({k: v for k, v in r["compute"].items() if k not in side_channels} for r in records)
    assert first == second and any("addmm" in op or "mm" in op for op in first["counted_ops"])
    assert [{**e, "seconds": 0} for e in records[0]["history"]] == [
        {**e, "seconds": 0} for e in records[1]["history"]
    ]


def _leaves(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def test_resume_across_dp_and_non_dp_is_refused_before_compute(digits_setup):
    """A DP checkpoint resumed without privacy would train on without DP and release a model the ledger does not
    cover; a non-DP checkpoint resumed under DP would claim a guarantee for steps taken without it."""
    dp_states: list[dict] = []
    _run_with_checkpoints(digits_setup, privacy=DP_RESUME, states=dp_states)
    with pytest.raises(
        ValueError, match=r"checkpoint at step 2 was saved by a DP run, but this run is not DP"
    ):
        _run_with_checkpoints(digits_setup, privacy=None, resume=dp_states[0])
    plain_states: list[dict] = []
    _run_with_checkpoints(digits_setup, privacy=None, states=plain_states)
    with pytest.raises(ValueError, match=r"saved by a non-DP run, but this run is DP"):
        _run_with_checkpoints(digits_setup, privacy=DP_RESUME, resume=plain_states[0])


def _tiny_checkpointed_run(
    *, learning_rate: float = 1e-2, resume=None, identity=None, save=None, steps: int = 6
) -> dict[str, torch.Tensor]:
    """A tiny non-DP LoRA run saving every 2 steps through ``save``; returns its trainable parameters."""
    data, vqvae, var = _tiny_lora_setup()
    finetune(
        var,
        vqvae,
        data,
        optimization=optimization(steps, learning_rate=learning_rate, batch_size=8, seed=3),
        method=MethodConfig(name="lora", lora_rank=4),
        plan=RunPlan(planned_steps=steps, log_every=1),
        checkpointing=Checkpointing(
            save=save or (lambda state: None),
            resources=resources(every_steps=2, every_fraction=1.0),
            resume=resume,
            **({} if identity is None else {"identity": identity}),
        ),
    )
    return {n: p.detach().clone() for n, p in trainable_parameters(var).items()}


def test_a_state_names_its_training_and_another_training_refuses_it():
    """A training state carries what defines its training (the caller's identity, else a hash of the sections) and
    the planned steps: another trial's state (other learning rate, other plan) is refused before compute, naming
    both; a state from before states carried them still resumes, bit-identically, unless its step is past the plan."""
    states: list[dict] = []
    whole = _tiny_checkpointed_run(save=lambda state: states.append(copy.deepcopy(state)))
    state = states[0]
    assert state["step"] == 2 and state["planned_steps"] == 6 and len(state["identity"]) == 16
    with pytest.raises(
        ValueError, match=rf"saved by training '{state['identity']}' of 6 planned.*this run is '"
    ):
        _tiny_checkpointed_run(learning_rate=5e-2, resume=state)
    with pytest.raises(ValueError, match=r"of 6 planned steps, but this run is .* of 8 planned steps"):
        _tiny_checkpointed_run(resume=state, steps=8)
    named: list[dict] = []
    _tiny_checkpointed_run(identity="trial-a", save=named.append)
    assert named[0]["identity"] == "trial-a"
    with pytest.raises(ValueError, match=r"saved by training 'trial-a' .* this run is 'trial-b'"):
        _tiny_checkpointed_run(identity="trial-b", resume=named[0])
    older = {key: value for key, value in state.items() if key not in ("identity", "planned_steps")}
    resumed = _tiny_checkpointed_run(resume=older)
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    with pytest.raises(ValueError, match=r"checkpoint is at step 7, past this run's 6 planned steps"):
        _tiny_checkpointed_run(resume={**older, "step": 7})


def test_a_kept_state_holds_its_own_step_s_optimizer_state():
    """torch's ``optimizer.state_dict()`` holds the live moment and step tensors: a save callback that keeps the
    dict (a Ray report may hold it while training goes on) must still hold the state of the step it was saved at,
    and resume as the whole run did."""
    kept: list[dict] = []
    snapshots: list[dict] = []
    whole = _tiny_checkpointed_run(
        save=lambda state: kept.append(state) or snapshots.append(copy.deepcopy(state))
    )
    assert [s["step"] for s in kept] == [2, 4, 6] and kept[-1]["optimizer"] == {}  # none in the final state
    for state, snapshot in zip(kept[:-1], snapshots):
        for index, moments in state["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, snapshot["optimizer"]["state"][index][key]), (state["step"], key)
    assert int(kept[0]["optimizer"]["state"][0]["step"]) == 2
    resumed = _tiny_checkpointed_run(resume=kept[0])
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


# A learning rate and weight decay whose first step overflows every parameter (AdamW multiplies by 1 - lr * wd).
OVERFLOWING = {"learning_rate": 1e37, "weight_decay": 100.0, "global_clip_norm": None}


def _diverging_run(
    *,
    private: bool,
    steps: int,
    log_every: int,
    every: int,
    saved: list[int],
    evaluated: list[int] | None = None,
) -> None:
    data, vqvae, var = _tiny_lora_setup()
    finetune(
        var,
        vqvae,
        data,
        optimization=optimization(steps, batch_size=8, **OVERFLOWING),
        method=MethodConfig(name="lora", lora_rank=4),
        plan=RunPlan(
            planned_steps=steps, log_every=log_every, evaluation_steps=(1,) if evaluated is not None else ()
        ),
        privacy=PrivacyConfig(target_epsilon=8, sampling_rate=0.5, max_grad_norm=1.0) if private else None,
        debug_seed=0 if private else None,
        checkpointing=Checkpointing(
            save=lambda state: saved.append(state["step"]),
            resources=resources(every_steps=every, every_fraction=1.0),
        ),
        evaluate_fn=None if evaluated is None else (lambda var: evaluated.append(1) or {}),
    )


@pytest.mark.parametrize("private", (False, True))
@pytest.mark.parametrize(
    "steps, log_every, every, caught",
    [
        (3, 1, 1000, "logged"),  # the logged loss without DP; the parameters at a logging step under DP
        (3, 1000, 1, "parameters became non-finite at step 1"),  # the state about to be saved
        (1, 1000, 1000, "parameters became non-finite at step 1"),  # after the final step
    ],
    ids=("at-a-logging-step", "before-a-save", "after-the-final-step"),
)
def test_a_diverged_run_stops_naming_the_step_and_saves_no_diverged_state(
    private, steps, log_every, every, caught
):
    """A run whose parameters overflow raises ``TrainingDiverged`` naming the step and the setting to lower, and
    saves no state of the diverged model (a retry would resume it): caught by the logged loss (without DP), the
    parameters at a logging step (under DP the loss is private, the noised parameters public), the state about to
    be saved, or the parameters after the final step (its update follows the last logged loss)."""
    if caught == "logged":
        caught = (
            "parameters became non-finite at step 1"
            if private
            else "the loss and the grad_norm became non-finite at step 2"
        )
    saved: list[int] = []
    with pytest.raises(TrainingDiverged, match=caught + r".*lower optimization.learning_rate"):
        _diverging_run(private=private, steps=steps, log_every=log_every, every=every, saved=saved)
    assert saved == []


@pytest.mark.parametrize("private", (False, True))
def test_a_diverged_model_is_not_evaluated_on_the_curve(private):
    """Every rank checks the parameters at a convergence step (only rank 0 evaluates, and sampling a diverged model
    fails there alone: the other ranks would wait, and a retry would diverge again)."""
    saved, evaluated = [], []
    with pytest.raises(TrainingDiverged, match="parameters became non-finite at step 1"):
        _diverging_run(private=private, steps=3, log_every=1000, every=1000, saved=saved, evaluated=evaluated)
    assert saved == [] and evaluated == []


@pytest.mark.parametrize("private", (False, True))
def test_a_step_out_of_gpu_memory_names_the_rows_per_forward_to_lower(private, monkeypatch):
    """CUDA's out-of-memory error of a step (a DP paper trial put 256 rows of 680 tokens through one forward,
    ~190 GiB at d16) said nothing of the setting that sets a step's memory: it names the rows per forward, the
    least they may be (k under DP) and that lowering them changes no number."""
    run, calls = StepMeter.run, []

    def out_of_memory_at_the_second_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139 GiB total)"
            )
        return run(self, *args, **kwargs)

    monkeypatch.setattr(StepMeter, "run", out_of_memory_at_the_second_step)
    _, vqvae, var = _tiny_lora_setup()
    g = torch.Generator().manual_seed(1)
    data = TokenViews(
        torch.randint(0, 3, (16,), generator=g),
        tuple(torch.randint(0, 64, (16, 2, pn * pn), generator=g) for pn in TINY_VAR["patch_nums"]),
    )
    floor = "down to 1: below k = 2 an example's views take several forwards" if private else "at least 1"
    message = (
        r"step 2: the GPU ran out of memory with resources.rows_per_forward = 4 rows per forward \(no CUDA "
        rf"device\): lower it \({floor}; accumulated, it changes no number and no trial id\).*CUDA said: CUDA "
        "out of memory"
    )
    with pytest.raises(OutOfGpuMemory, match=message):
        finetune(
            var,
            vqvae,
            data,
            optimization=optimization(3, learning_rate=1e-3, batch_size=8),
            method=MethodConfig(name="lora", lora_rank=4),
            plan=RunPlan(planned_steps=3),
            privacy=PrivacyConfig(
                target_epsilon=8, sampling_rate=0.5, max_grad_norm=1.0, augmentation_multiplicity=2
            )
            if private
            else None,
            debug_seed=0 if private else None,
            resources=ResourcesConfig(rows_per_forward=4),
        )


def test_bf16_autocast_is_off_for_ghost_clipping_only():
    """Ghost clipping takes its norms in the activations' dtype, so it trains in float32; the other modes may
    autocast (their per-example norms are float32, see test_privacy)."""
    bf16 = optimization(1, autocast_bf16=True)
    spec = lambda clipping: PrivacyConfig(  # noqa: E731
        target_epsilon=8.0, sampling_rate=0.25, max_grad_norm=1.0, clipping=clipping
    )
    assert training_autocast(bf16, None)
    assert [training_autocast(bf16, spec(c)) for c in ("auto", "hooks", "bookkeeping", "ghost")] == [
        True,
        True,
        True,
        False,
    ]
    assert not training_autocast(optimization(1, autocast_bf16=False), None)


class TrainingClock:
    """A wall clock (seconds) that advances ``per_step`` at every logged step: the run's own history drives time,
    so the saves by time are deterministic."""

    def __init__(self, per_step: float):
        self.now, self.per_step = 0.0, per_step

    def __call__(self) -> float:
        return self.now

    def tick(self, entry: dict) -> None:
        self.now += self.per_step


def _timed_run(
    digits_setup, *, clock: TrainingClock, every: int = 1000, every_fraction: float = 1.0, resume=None
):
    vqvae, data, _, num_classes = digits_setup
    var = base_var()
    adapt(var, MethodConfig(name="lora"), num_classes=num_classes, seed=0)
    states: list[dict] = []
    checkpointing = Checkpointing(
        save=lambda state: states.append(copy.deepcopy(state)),
        clock=clock,
        resume=resume,
        resources=resources(every_steps=every, every_minutes=1.0, every_fraction=every_fraction),
    )
    finetune(
        var,
        vqvae,
        data,
        optimization=optimization(6, learning_rate=1e-3, batch_size=16, seed=3),
        method=MethodConfig(name="lora"),
        plan=RunPlan(planned_steps=6, log_every=1),
        log=clock.tick,
        checkpointing=checkpointing,
    )
    return states


def test_a_long_run_saves_by_wall_clock_time_and_after_the_final_step(digits_setup):
    """No step-based save falls inside the run (every 1000 steps); 25 s per step and a 1-minute limit save after
    step 3 (75 s); the final step saves whatever the clock says (the final state, see the next tests)."""
    states = _timed_run(digits_setup, clock=TrainingClock(per_step=25.0))
    assert [s["step"] for s in states] == [3, 6]
    assert [s["step"] for s in _timed_run(digits_setup, clock=TrainingClock(per_step=1.0))] == [
        6
    ]  # time never due


def test_a_resumed_run_continues_the_step_schedule(digits_setup):
    """A third of 6 planned steps: saves after steps 2 and 4; a run resumed at step 2 saves at 4 only."""
    states = _timed_run(digits_setup, clock=TrainingClock(per_step=0.0), every_fraction=1 / 3)
    assert [s["step"] for s in states] == [2, 4, 6]
    resumed = _timed_run(
        digits_setup, clock=TrainingClock(per_step=0.0), every_fraction=1 / 3, resume=states[0]
    )
    assert [s["step"] for s in resumed] == [4, 6]


def _ddp_timed_worker(rank: int, world: int, init_file: str, result_file: str, as_nccl: bool) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    if as_nccl:  # the default group reads as NCCL's: the decision goes over a gloo group of its own
        groups = []
        torch.distributed.get_backend = lambda group=None: "nccl" if group is None else "gloo"
        new_group = torch.distributed.new_group
        torch.distributed.new_group = lambda *args, **kwargs: (
            groups.append(kwargs) or new_group(*args, **kwargs)
        )
    try:
        data, vqvae, var = _tiny_lora_setup()
        # Rank 1's clock never reaches the limit, rank 0's does after step 3: every rank must save where rank 0 says.
        clock, saved = TrainingClock(per_step=25.0 if rank == 0 else 0.0), []
        checkpointing = Checkpointing(
            save=lambda state: saved.append(state["step"]),
            clock=clock,
            resources=resources(every_steps=1000, every_minutes=1.0, every_fraction=1.0),
        )
        finetune(
            var,
            vqvae,
            data,
            optimization=optimization(6, learning_rate=1e-2, batch_size=8),
            method=MethodConfig(name="lora", lora_rank=4),
            plan=RunPlan(planned_steps=6, log_every=1),
            log=clock.tick,
            checkpointing=checkpointing,
        )
        if as_nccl:
            assert groups == [{"backend": "gloo"}]
        torch.save(saved, f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("as_nccl", (False, True))
def test_under_ddp_every_rank_saves_where_rank_0s_clock_says(tmp_path, as_nccl):
    """``ray.train.report`` is a barrier: a save by time on one rank only would hang the trial. Under NCCL the
    decision goes over a gloo group: a CUDA tensor read back every step would make the host wait for the GPU."""
    torch.multiprocessing.spawn(
        _ddp_timed_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "saved"), as_nccl),
        nprocs=2,
        join=True,
    )
    assert [torch.load(tmp_path / f"saved.{rank}", weights_only=True) for rank in (0, 1)] == [[3, 6], [3, 6]]


@pytest.mark.parametrize("private", (False, True))
def test_a_run_saves_its_final_state_and_a_retry_from_it_trains_no_step_again(private):
    """A run saves after its final step too: a retry whose final evaluation failed then resumes the final model and
    trains nothing, where it had retrained up to a quarter of the run (under DP with fresh noise: a second noised
    model of steps the ledger counts once). The final state leaves out the optimiser's moments (gigabytes for full
    fine-tuning), which nothing trains from; a state of an earlier step without them is refused."""

    def run(saved: list[dict], resume: dict | None = None) -> tuple[dict, dict]:
        data, vqvae, var = _tiny_lora_setup()
        out = finetune(
            var,
            vqvae,
            data,
            optimization=optimization(3, batch_size=8, learning_rate=1e-2),
            method=MethodConfig(name="lora", lora_rank=4),
            plan=RunPlan(planned_steps=3, log_every=1),
            privacy=PrivacyConfig(target_epsilon=8, sampling_rate=0.5, max_grad_norm=1.0)
            if private
            else None,
            checkpointing=Checkpointing(
                save=lambda state: saved.append(copy.deepcopy(state)),
                resources=resources(every_steps=2, every_fraction=1.0),
                resume=resume,
            ),
        )
        return out, {n: p.detach().clone() for n, p in trainable_parameters(var).items()}

    saved: list[dict] = []
    out, final = run(saved)
    assert [s["step"] for s in saved] == [2, 3]
    assert saved[0]["optimizer"]["state"] and saved[-1]["optimizer"] == {}
    again, resumed = run(saved_again := [], resume=saved[-1])
    assert all(torch.equal(final[n], resumed[n]) for n in final) and saved_again == []
    assert (
        again["history"] == out["history"]
        and again["compute"]["rows_trained"] == out["compute"]["rows_trained"]
    )
    if private:
        assert again["privacy"]["steps"] == out["privacy"]["steps"] == 3
        assert again["privacy"]["epsilon_rdp"] == out["privacy"]["epsilon_rdp"]
    with pytest.raises(ValueError, match="checkpoint of step 2 \\(of 3\\) holds no optimiser state"):
        run([], resume={**saved[0], "optimizer": {}})


def test_a_damaged_training_state_is_named_with_its_checkpoint(tmp_path):
    """A truncated training_state.pt raised torch's bare "failed finding central directory", naming neither the
    checkpoint nor the trial, at every retry."""
    from trainables.ray_worker import STATE_FILE, read_state

    path = tmp_path / STATE_FILE
    torch.save({"step": 3, "trainable": {"w": torch.zeros(1000)}}, path)
    assert read_state(path, where="runs/train/trial-x/checkpoint_000001")["step"] == 3
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        RuntimeError,
        match=r"checkpoint runs/train/trial-x/checkpoint_000001 cannot be read .*"
        r"delete the trial's training run \(runs/train/trial-x\)",
    ):
        read_state(path, where="runs/train/trial-x/checkpoint_000001")
    path.write_text("step 3")  # torch's errors for text escaped: IndexError here, KeyError: 101 for "e..."
    with pytest.raises(RuntimeError, match=r"checkpoint c cannot be read \(IndexError"):
        read_state(path, where="c")
    torch.save([1, 2], path)
    with pytest.raises(RuntimeError, match="not one this code wrote"):
        read_state(path, where="c")
    # One changed byte inside a tensor loaded silently, with changed weights (its member's CRC-32 differs)
    torch.save({"step": 3, "trainable": {"w": torch.zeros(1000)}}, path)
    damaged = bytearray(path.read_bytes())
    at = bytes(damaged).index(bytes(torch.zeros(1000).numpy().tobytes()[:64]))
    damaged[at + 100] ^= 0x40
    path.write_bytes(bytes(damaged))
    with pytest.raises(RuntimeError, match=r"checkpoint c cannot be read \(CheckpointError: .*is damaged"):
        read_state(path, where="c")
    with pytest.raises(RuntimeError, match="cannot be read .*FileNotFoundError"):
        read_state(tmp_path / "missing.pt", where="c")
