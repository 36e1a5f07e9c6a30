"""DP-SGD for VAR adaptation through Opacus: calibration, Poisson sampling, per-example clipping with augmentation
multiplicity, physical (virtual) batches, DP-DDP and the privacy ledger.

The privacy unit is one training example. Each step samples every example independently with probability q
(Poisson), computes for each sampled example the average gradient over its k augmented views, clips that average
to norm C once (so the sensitivity is C whatever k is), sums, adds N(0, (sigma C)^2) noise and divides by the
expected batch size q N. sigma is calibrated so that the planned number of steps spends at most the target epsilon
at delta (by the RDP or the PRV accountant, each cross-checked with the other); training cannot take more steps
than planned.

Clipping is done by book-keeping (``bookkeeping.py``: one backward, no per-sample weight copies) unless
Opacus's per-sample hooks or ghost clipping are asked for. With book-keeping the noise and the division are
``noised_mean``'s (the same mechanism and generator as Opacus's pre-step, in fewer passes over the parameters);
with hooks and ghost clipping, Opacus's optimiser's.

Under DDP every rank draws the same global Poisson mask (shared seed) and takes its share of the selected
examples, so the global batch and the ledger are exactly those of one process; only rank 0 adds noise
(as Opacus's ``DistributedDPOptimizer``) and the all-reduce averages the per-rank sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import opacus
import torch
import torch.distributed as dist
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.grad_sample_module import (
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.module_utils import trainable_parameters as opacus_trainable_parameters
from torch import nn

from bench.errors import VarsweepError
from bench.schema import ACCOUNTANTS, MAX_TARGET_EPSILON, PRV_MAX_EPSILON, PrivacyConfig, ResourcesConfig

from . import bookkeeping
from .bookkeeping import BookKeeping, bookkeeping_supports
from .draws import ExampleKey
from .training import average_gradients, examples_per_forward, rank_and_world, views_per_forward

# Layers whose per-sample gradient is a sum over positions of (input, output-gradient) products: the k views of one
# example can be folded into the position dimension and the example's gradient computed in one pass.
FOLDABLE_LAYERS = (nn.Linear, nn.Embedding)
# 3: the settings under their PrivacyConfig names (physical_batch_size -> physical_batch_rows); 4: no
# physical_batch_rows (it left the privacy settings: the trial's cost records its rows_per_forward)
LEDGER_VERSION = 4
# RDP orders for calibration and reporting. Opacus's defaults stop at 63 and start at 1.1: with few steps (the first
# logged epsilons) or large noise the best order lies above 63, and for large epsilon (Table 3 goes to 1000) below
# 1.1, so both ends over-state epsilon and calibrate sigma higher than needed. These add 1.01-1.08 and orders up to
# 4096 (dp-accounting also goes to the thousands), sparsely because each order costs Python-loop time in every
# epsilon evaluation; a superset of the defaults, so the bound is never looser.
RDP_ORDERS = (
    [1.01, 1.02, 1.04, 1.06, 1.08]
    + [1 + x / 10 for x in range(1, 100)]
    + list(range(11, 64))
    + [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
)

# Every ledger cross-checks the RDP epsilon with the PRV accountant, except above PRV_MAX_EPSILON (bench.schema):
# there the guarantee says nothing and Opacus's PRV grid grows with epsilon. A trial calibrated with the PRV
# accountant (a target of at most that epsilon) always gets its reading.


class PrivacyConfigError(VarsweepError):
    """An impossible or unsafe privacy setting, raised before any compute is spent. The settings themselves are
    ``bench.schema.PrivacyConfig``, which checks every value on its own at construction; what is raised here
    depends on the training split's size N or the step count."""


class MultiViewGradSampleModule(GradSampleModule):
    """Opacus hooks that give each example the per-sample gradient of the mean loss over its k views.

    The batch holds k consecutive rows per example (example-major). For linear and embedding layers the views are
    folded into the position dimension before the per-sample rule runs, so the example's gradient is formed
    directly (k times fewer per-sample tensors than per-row gradients averaged afterwards); other layers (small
    patched parameters) compute per-row gradients and average them over the views.
    """

    def __init__(self, module: nn.Module, *, views_per_example: int):
        self.views_per_example = views_per_example
        super().__init__(module, batch_first=True, loss_reduction="sum", strict=True)

    def capture_backprops_hook(
        self, module: nn.Module, _forward_input, forward_output, loss_reduction: str, batch_first: bool
    ) -> None:
        if not self.hooks_enabled:
            return
        activations, backprops = self.rearrange_grad_samples(
            module=module,
            backprops=forward_output[0].detach(),
            loss_reduction=loss_reduction,
            batch_first=batch_first,
        )
        # Per-sample gradients (hence their norms and the clipping factor) in float32 even under bf16 autocast.
        activations = [a.float() if a.is_floating_point() else a for a in activations]
        backprops = backprops.float()
        k, rule = self.views_per_example, self.GRAD_SAMPLERS[type(module)]
        if isinstance(module, FOLDABLE_LAYERS):
            folded = rule(module, [_fold_views(a, k) for a in activations], _fold_views(backprops, k))
            grad_samples = {p: g / k for p, g in folded.items()}
        else:
            grad_samples = {
                p: g.view(-1, k, *g.shape[1:]).mean(1)
                for p, g in rule(module, activations, backprops).items()
            }
        for param, grad_sample in grad_samples.items():
            create_or_accumulate_grad_sample(
                param=param, grad_sample=grad_sample, max_batch_len=module.max_batch_len // k
            )
        for _, param in opacus_trainable_parameters(module):
            param._forward_counter -= 1
            if param._forward_counter == 0:
                promote_current_grad_sample(param)
        if not module.activations and hasattr(module, "max_batch_len"):
            del module.max_batch_len


def _fold_views(rows_R: torch.Tensor, k: int) -> torch.Tensor:
    """Example-major rows [B*k, ...] -> [B, k, ...]; the linear and embedding rules sum over every middle dim."""
    return rows_R.reshape(rows_R.shape[0] // k, k, *rows_R.shape[1:])


def validate_privacy(privacy: PrivacyConfig, *, dataset_size: int, planned_steps: int) -> float:
    """The checks that need N and the step count (the settings alone were checked by ``PrivacyConfig``): raise
    ``PrivacyConfigError`` naming the field for an impossible combination; return the resolved delta (1/N when
    ``privacy.delta`` is None)."""
    problems = []
    if dataset_size < 1 or planned_steps < 1:
        problems.append(
            f"need a non-empty dataset and >= 1 planned step, got N={dataset_size}, steps={planned_steps}"
        )
    delta = 1.0 / max(dataset_size, 1) if privacy.delta is None else privacy.delta
    if dataset_size >= 1 and not delta < 1.0:
        problems.append(
            f"privacy.delta: 1/N = 1 for N={dataset_size} training example; give privacy.delta below 1"
        )
    elif (
        privacy.delta is not None
        and dataset_size >= 1
        and delta >= 1.0 / dataset_size
        and not privacy.allow_delta_at_least_inverse_n
    ):
        problems.append(
            f"privacy.delta={delta} >= 1/N = {1.0 / dataset_size:.3g}; set privacy.allow_delta_at_least_inverse_n=true "
            "to accept it"
        )
    if dataset_size >= 1 and privacy.expected_batch(dataset_size) < 1:
        # Most steps would draw no example: their update is the noise alone, scaled up by 1/(qN).
        problems.append(
            f"privacy.sampling_rate: q*N = {privacy.sampling_rate * dataset_size:.3g} expected examples per step "
            f"for N={dataset_size}, below one, so most steps would train on noise alone; set sampling_rate >= "
            f"1/N = {1.0 / dataset_size:.3g}"
        )
    if problems:
        raise PrivacyConfigError("invalid privacy settings:\n  - " + "\n  - ".join(problems))
    return delta


# The calibration's domain: far beyond any meaningful run (MAX_TARGET_EPSILON: bench.schema, where the config
# refuses a larger target).
MAX_CALIBRATED_STEPS = 10**9


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sampling_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest sigma (to within 1% of ``target_epsilon``, at most 0.01 in epsilon) whose ``steps`` Poisson-subsampled
    Gaussian steps spend at most ``target_epsilon`` at ``delta`` (RDP over ``RDP_ORDERS``, or PRV)."""
    # Opacus's bisection never ends at 0 steps (epsilon stays 0 however small sigma gets), nor where its float
    # sigmas cannot reach the target's tolerance (epsilon 1e15, or 1e15 steps: a preflight that hung, silent):
    # refused here, where every trial and the driver's preflight calibrate, before Opacus is called.
    if not (
        1 <= steps <= MAX_CALIBRATED_STEPS
        and 0 < sampling_rate <= 1
        and 0 < delta < 1
        and 0 < target_epsilon <= MAX_TARGET_EPSILON
    ):
        raise PrivacyConfigError(
            f"cannot calibrate noise for epsilon={target_epsilon}, delta={delta}, q={sampling_rate} over {steps} "
            f"steps: need 1 to {MAX_CALIBRATED_STEPS:.0e} steps, 0 < q <= 1, 0 < delta < 1 and 0 < epsilon <= "
            f"{MAX_TARGET_EPSILON:.0e} (a budget beyond that guarantees nothing: train without privacy)"
        )
    try:
        return _calibrated(float(target_epsilon), float(delta), float(sampling_rate), int(steps), accountant)
    except ValueError as err:
        raise PrivacyConfigError(
            f"cannot reach epsilon={target_epsilon} at delta={delta} with q={sampling_rate} over "
            f"{steps} steps: {err}"
        ) from err


@functools.lru_cache(maxsize=256)
def _calibrated(
    target_epsilon: float, delta: float, sampling_rate: float, steps: int, accountant: str
) -> float:
    # A calibration takes seconds (a bisection, each point evaluating every order); the preflight and make_private
    # of one trial, and the trials of a sweep, ask for the same one.
    orders = {"alphas": RDP_ORDERS} if accountant == "rdp" else {}
    # The bisection reads epsilon at sigmas far from its answer (RDP at epsilon 1e4: 22 warnings), and a PRV
    # calibration reads PRV epsilons (six at sigma ~16); the answer's own reading is the ledger's.
    with _without_order_range_warnings():
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sampling_rate,
            steps=steps,
            accountant=accountant,
            # Opacus's absolute 0.01 gave epsilon 0.01 a sigma of 160 where 88 spends it (0.0055 spent)
            epsilon_tolerance=min(0.01, 0.01 * target_epsilon),
            **orders,
        )
    return float(sigma)


@contextlib.contextmanager
def _without_order_range_warnings():
    """Silences Opacus's "Optimal order is the largest/smallest alpha ... expanding the range of alphas" where it
    concerns no reading varsweep reports: around PRV readings (the PRV accountant sizes its grid with an RDP bound
    over Opacus's default orders, 1.1-63, which only widens the grid when loose; seen in common settings, sigma 3,
    q = 0.01, 10 steps: twice per reading) and calibrations (their bisection's trial sigmas). It told users to widen
    orders that ``RDP_ORDERS`` already widens. The RDP reading's own warning, about ``RDP_ORDERS``, is kept."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Optimal order is the (largest|smallest) alpha")
        yield


def epsilon_spent(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    rdp_orders: list[float] | None = None,
    accountants: tuple[str, ...] = ACCOUNTANTS,
) -> dict[str, float]:
    """Epsilon after ``steps`` steps by the RDP (over ``RDP_ORDERS`` unless ``rdp_orders``) and the PRV accountant
    (0 for no steps). PRV takes ~0.1-3 s up to epsilon 100 and far longer beyond (``PRV_MAX_EPSILON``); pass
    ``accountants=("rdp",)`` for a quick reading. A reading below 0 is 0: at a delta as large as 1/N of a small
    set both conversions go negative (-0.05 at one step, N 19, q 0.5, sigma 23), and an (epsilon, delta) bound with
    epsilon < 0 holds at epsilon 0, the smallest a record may state."""
    spent = {}
    for name in accountants:
        if steps == 0:
            spent[name] = 0.0
        elif name == "rdp":  # RDPAccountant's reading, its one-step RDP computed once per (sigma, q, orders)
            orders = tuple(rdp_orders or RDP_ORDERS)
            rdp = _rdp_of_one_step(noise_multiplier, sampling_rate, orders) * steps
            # max(reading, 0.0), not max(0.0, reading): a NaN reading stays NaN, never a "nothing spent"
            spent[name] = max(
                float(rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)[0]), 0.0
            )
        else:
            accountant = PRVAccountant()
            accountant.history = [(noise_multiplier, sampling_rate, steps)]
            with _without_order_range_warnings():
                spent[name] = max(float(accountant.get_epsilon(delta=delta)), 0.0)
    return spent


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sampling_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus's RDP of one step at each order (``compute_rdp`` with steps=1, which ``steps`` only multiplies): the
    whole cost of an RDP reading (tens to hundreds of milliseconds over ``RDP_ORDERS``), which a DP run paid at every
    logging step for the same sigma and q while the GPU waited. Read-only (callers multiply it into a new array)."""
    rdp = rdp_analysis.compute_rdp(
        q=sampling_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)
    )
    rdp.setflags(write=False)
    return rdp


def poisson_batch(
    num_examples: int, sampling_rate: float, *, generator: torch.Generator, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Indices [b] of this rank's share of one Poisson-sampled global batch. Every rank must pass a generator in
    the same state: they draw the same global mask and split the selected examples round-robin."""
    # float64 uniforms: float32's come in steps of 2**-24, so u < q would hold with probability up to 6e-8 above
    # the q the accountant is given; in steps of 2**-53 the excess is below what the accounting resolves.
    selected_N = torch.rand(num_examples, generator=generator, dtype=torch.float64) < sampling_rate
    return selected_N.nonzero().flatten()[rank::world_size]


@dataclass
class PrivateTraining:
    """Everything DP-SGD needs between steps: the per-sample-gradient module, the DP optimiser, the schedule
    and the record of what was spent."""

    module: nn.Module
    optimizer: DPOptimizer
    privacy: PrivacyConfig
    noise_multiplier: float
    delta: float
    dataset_size: int
    planned_steps: int
    world_size: int = 1
    rank: int = 0
    clipping: str = "hooks"
    noise_seeded_by_caller: bool = False
    sampling_generator: torch.Generator | None = None
    sampling_seeded_by_caller: bool = False
    example_key: ExampleKey | None = (
        None  # per-example draws (views, class dropout, drop-path): secret unless caller-seeded
    )
    steps_taken: int = (
        0  # the accounting needs the number of steps only; the actual batch sizes are never kept
    )
    unsafe_skip_clipping: bool = False  # test-only broken mechanism (see make_private): no DP guarantee
    examples_per_chunk: int | None = None  # examples per forward/backward (None: the whole local batch)
    views_per_chunk: int | None = None  # one example's views per forward where they take several (None: one)

    @property
    def steps(self) -> int:
        return self.steps_taken

    @property
    def expected_batch_size(self) -> int:
        return self.privacy.expected_batch(self.dataset_size)

    @property
    def budget_left(self) -> bool:
        return self.steps < self.planned_steps


def privacy_state_dict(state: PrivateTraining) -> dict:
    """What a resumed run needs to keep its accounting: the settings, sigma and the number of steps already taken.
    No generator state: a checkpoint must not let its reader predict later noise, sampling or per-example draws."""
    return {
        "spec": dataclasses.asdict(state.privacy),
        "noise_multiplier": state.noise_multiplier,
        "delta": state.delta,
        "dataset_size": state.dataset_size,
        "planned_steps": state.planned_steps,
        "steps": state.steps,
    }


def load_privacy_state(state: PrivateTraining, record: dict, *, step: int) -> None:
    """Continue the accounting of an interrupted run in a freshly made ``state`` (same settings, fresh entropy: the
    steps redone after a failure are new draws, and each is accounted as a step). ``step``: the training step the
    saved state is at, which must be the number of noised steps it counts (one each)."""
    expected = privacy_state_dict(state)
    differing = [
        key
        for key in ("spec", "noise_multiplier", "delta", "dataset_size", "planned_steps")
        if record.get(key) != expected[key]
    ]
    if differing:
        raise PrivacyConfigError(
            f"the saved privacy state differs from this run in {differing}; a DP run resumes only with identical settings"
        )
    steps = (
        int(record["steps"]) if "steps" in record else len(record["batch_sizes"])
    )  # ledger version 1 kept every batch size
    if steps > state.planned_steps:
        raise PrivacyConfigError(
            f"the saved run already took {steps} steps, more than the {state.planned_steps} planned"
        )
    if steps != step:
        # A ledger counting fewer steps than were trained would report less privacy spent than was.
        raise PrivacyConfigError(
            f"the saved privacy state counts {steps} noised steps but its training state is at step {step}: the "
            "checkpoint was altered after it was saved; restore it, or train the trial again from its first step"
        )
    state.steps_taken = steps


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    privacy: PrivacyConfig,
    dataset_size: int,
    planned_steps: int,
    noise_multiplier: float | None = None,
    resources: ResourcesConfig | None = None,
    noise_generator: torch.Generator | None = None,
    debug_seed: int | None = None,
    unsafe_skip_clipping: bool = False,
) -> PrivateTraining:
    """Wrap an adapted model and its optimiser for DP-SGD. Checks what depends on N and the steps first; uses
    ``noise_multiplier`` (sigma, the trial plan's) or calibrates it for ``planned_steps``.
    The noise, the Poisson sampling and the per-example draws (``state.example_key``) must be unpredictable for the
    accounting to hold, so by default all are seeded from OS entropy (the sampling seed and the example key are
    drawn on rank 0 and shared: all ranks draw one global mask, and an example's draws do not depend on its
    rank). ``noise_generator`` (on the parameters' device) and ``debug_seed`` (sampling and per-example draws)
    make a run reproducible, for tests and debugging only; the ledger says when they were used.
    ``unsafe_skip_clipping`` breaks the mechanism on purpose, for the privacy audit's tests only (never a config
    field): per-example gradients are summed unclipped while the noise stays calibrated to C, so the ledger's
    epsilon no longer holds (its ``clipping`` says so). Book-keeping clipping only (the others are refused).
    Under an initialised process group the model is synchronised from rank 0 and gradients are all-reduced.
    ``resources`` (None: the defaults) gives ``rows_per_forward``: a step's examples go through forward and
    backward in chunks of that many rows (examples x k views; 0: all at once), or, where that is fewer than k,
    one example at a time with its views spread over forwards (book-keeping clipping only,
    ``_split_views_clipped``); the clipped sum is the same up to rounding."""
    delta = validate_privacy(privacy, dataset_size=dataset_size, planned_steps=planned_steps)
    check_per_sample_support(model)
    clipping = resolve_clipping(privacy, model)
    chunk, views_per_chunk = _forward_chunks(
        resources or ResourcesConfig(), privacy=privacy, clipping=clipping
    )
    sigma = (
        noise_multiplier
        if noise_multiplier is not None
        else calibrate_noise_multiplier(
            target_epsilon=privacy.target_epsilon,
            delta=delta,
            sampling_rate=privacy.sampling_rate,
            steps=planned_steps,
            accountant=privacy.accountant,
        )
    )
    rank, world_size = rank_and_world()
    device = next(model.parameters()).device
    noise_seeded_by_caller = noise_generator is not None
    if noise_generator is None:
        noise_generator = torch.Generator(device=device).manual_seed(_entropy_seed())
    sampling_generator = torch.Generator().manual_seed(
        _shared_seed(debug_seed, world_size=world_size, device=device)
    )
    if world_size > 1:
        _broadcast_parameters(model)
    # Gradients are averaged over the expected *global* batch; each rank divides by its share before the all-reduce sum / W.
    expected_per_rank = privacy.expected_batch(dataset_size) / world_size
    dp_options = dict(
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=expected_per_rank,
        loss_reduction="mean",
        generator=noise_generator,
    )
    if unsafe_skip_clipping and clipping != "bookkeeping":
        raise PrivacyConfigError(
            f"the test-only unsafe_skip_clipping switch works with book-keeping clipping, not {clipping!r}"
        )
    fast_clipping = (
        DistributedDPOptimizerFastGradientClipping if world_size > 1 else DPOptimizerFastGradientClipping
    )
    if clipping == "bookkeeping":
        module = BookKeeping(model)
        dp_optimizer = fast_clipping(optimizer, **dp_options)
        _check_same_parameters(module.params, dp_optimizer.params)
    elif clipping == "ghost":
        module = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=privacy.max_grad_norm,
            use_ghost_clipping=True,
        )
        dp_optimizer = fast_clipping(optimizer, **dp_options)
    else:
        module = MultiViewGradSampleModule(model, views_per_example=privacy.augmentation_multiplicity)
        dp_optimizer = (DistributedDPOptimizer if world_size > 1 else DPOptimizer)(optimizer, **dp_options)
    example_key = (
        _shared_key(world_size=world_size, device=device)
        if debug_seed is None
        else ExampleKey.from_seed(debug_seed, purpose="dp examples")
    )
    return PrivateTraining(
        module=module,
        optimizer=dp_optimizer,
        privacy=privacy,
        noise_multiplier=sigma,
        delta=delta,
        dataset_size=dataset_size,
        planned_steps=planned_steps,
        world_size=world_size,
        rank=rank,
        clipping=clipping,
        noise_seeded_by_caller=noise_seeded_by_caller,
        sampling_generator=sampling_generator,
        sampling_seeded_by_caller=debug_seed is not None,
        example_key=example_key,
        unsafe_skip_clipping=unsafe_skip_clipping,
        examples_per_chunk=chunk,
        views_per_chunk=views_per_chunk,
    )


def _forward_chunks(
    resources: ResourcesConfig, *, privacy: PrivacyConfig, clipping: str
) -> tuple[int | None, int | None]:
    """(examples, views of one example) per forward for ``resources.rows_per_forward``; fewer rows than k split an
    example's views over forwards, which only book-keeping's route can clip (Opacus's hooks and ghost clipping
    take an example's gradient from the one forward that holds all its views)."""
    rows, k = resources.rows_per_forward, privacy.augmentation_multiplicity
    views = views_per_forward(rows, views_per_example=k)
    if views is not None and clipping != "bookkeeping":
        mode = repr(clipping)
        fix = "use rows_per_forward >= k or privacy.clipping 'bookkeeping'"
        # book-keeping has no rule for a trainable layer, or the model ties weights
        if privacy.clipping == "auto":
            mode = (
                f"'auto', which is {clipping!r} for this model (book-keeping has no rule for one of its trainable "
                "layers, or two layers share a parameter)"
            )
            fix = "use rows_per_forward >= k"
        raise PrivacyConfigError(
            f"resources.rows_per_forward: {rows} rows hold fewer than one example's k={k} views; spreading an "
            f"example's views over forwards needs book-keeping clipping, not {mode}: {fix}"
        )
    return examples_per_forward(rows, views_per_example=k, splits_views=True), views


def check_per_sample_support(model: nn.Module) -> None:
    """Every module owning trainable parameters must have an exact per-sample-gradient rule. Opacus would
    otherwise hand it to functorch with its positional inputs only: for VAR's root module or attention (keyword
    causal mask) that is slow or wrong. ``methods.adapt`` applies the patches that make VAR pass."""
    unsupported = sorted(
        {
            f"{name or '<root>'} ({type(module).__name__})"
            for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
            and type(module) not in GradSampleModule.GRAD_SAMPLERS
        }
    )
    if unsupported:
        raise PrivacyConfigError(
            "these modules own trainable parameters but have no per-sample-gradient rule: "
            f"{', '.join(unsupported[:8])}; prepare a VAR with trainables.methods.adapt() (it applies "
            "trainables.patches) before make_private"
        )


def _entropy_seed() -> int:
    # torch's generators are not cryptographic (Opacus's secure_mode needs torchcsprng, which current torch lacks);
    # seeding from OS entropy at least keeps noise and sampling independent of every user-visible seed.
    return int.from_bytes(os.urandom(8), "little") >> 1


def _from_rank_0(
    values: list[int], *, dtype: torch.dtype, world_size: int, device: torch.device
) -> list[int]:
    """Rank 0's ``values`` on every rank (a broadcast under a process group of ``world_size`` > 1)."""
    tensor = torch.tensor(values, dtype=dtype, device=device)
    if world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor.tolist()


def _shared_seed(seed: int | None, *, world_size: int, device: torch.device) -> int:
    """``seed``, or an entropy seed drawn on rank 0 and broadcast so that every rank draws the same mask."""
    value = _entropy_seed() if seed is None else seed
    return _from_rank_0([value], dtype=torch.long, world_size=world_size, device=device)[0]


def _shared_key(*, world_size: int, device: torch.device) -> ExampleKey:
    """A secret per-example key drawn on rank 0 and broadcast: an example's draws are the same on whichever rank the
    round-robin split of the batch puts it."""
    drawn = ExampleKey.from_entropy().key
    return ExampleKey(
        bytes(_from_rank_0(list(drawn), dtype=torch.uint8, world_size=world_size, device=device)), secret=True
    )


def next_batch(state: PrivateTraining) -> torch.Tensor:
    """This rank's share of the next Poisson batch, from the state's sampling generator."""
    return poisson_batch(
        state.dataset_size,
        state.privacy.sampling_rate,
        generator=state.sampling_generator,
        rank=state.rank,
        world_size=state.world_size,
    )


def release(state: PrivateTraining) -> None:
    """Remove the per-sample-gradient hooks from the model (the model can then be trained or wrapped again)."""
    if isinstance(state.module, BookKeeping):
        state.module.remove_hooks()
    else:
        state.module._close()


def resolve_clipping(privacy: PrivacyConfig, model: nn.Module) -> str:
    """The clipping mode ``privacy.clipping`` stands for with this model: "auto" is book-keeping when it has a rule
    for every trainable layer and no two layers share a parameter (always, for an adapted VAR), per-sample hooks
    otherwise."""
    if privacy.clipping != "auto":
        return privacy.clipping
    return "bookkeeping" if bookkeeping_supports(model) else "hooks"


def _broadcast_parameters(model: nn.Module) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


# loss_fn(chunk of example indices [b]) -> per-view losses [b, k] (each example's k views; labels dropped once per
# example). Where an example's views take several forwards it is called as loss_fn(one example [1], views=slice)
# -> losses [1, len(slice)] of those of its k views (the same draws as in one call).
ViewLossFn = Callable[..., torch.Tensor]


def private_step(
    state: PrivateTraining,
    indices: torch.Tensor,
    loss_fn: ViewLossFn,
    *,
    public_grad_fn: Callable[[], None] | None = None,
) -> None:
    """One DP-SGD step over this rank's examples ``indices`` (possibly none), in physical chunks.

    ``public_grad_fn`` may add gradients that depend on no private example (e.g. a distillation term on
    generated samples) to the noised ``p.grad``, typically by a ``backward()``; per-sample hooks are off meanwhile.
    Returns nothing: no loss, gradient statistic or batch size of the private examples leaves this function.
    """
    if not state.budget_left:
        raise RuntimeError(
            f"privacy budget exhausted: {state.steps} of {state.planned_steps} planned steps done"
        )
    optimizer = state.optimizer
    chunk = state.examples_per_chunk or max(1, len(indices))
    starts = list(range(0, len(indices), chunk)) or [0]
    if state.clipping == "bookkeeping":
        sums: dict = {}
        for i, start in enumerate(starts):
            if i:  # the last chunk's clipped sums stay unformed: the noised mean adds them into the noise
                bookkeeping.settle(sums)
            _accumulate_clipped(state, indices[start : start + chunk], loss_fn, into=sums)
        noised_mean(state, sums)
    else:
        for i, start in enumerate(starts):
            _accumulate_clipped(state, indices[start : start + chunk], loss_fn)
            if i < len(starts) - 1:
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if not optimizer.pre_step():
            raise RuntimeError(
                "DP optimiser skipped its final step: physical-batch bookkeeping is inconsistent"
            )
        _release_accumulators(optimizer)
    if public_grad_fn is not None:
        _add_public_gradient(state, public_grad_fn)
    if state.world_size > 1:  # Opacus's reduce_gradients, in fewer collectives; the public gradients too
        average_gradients([p for p in optimizer.params if p.requires_grad], state.world_size)
    state.steps_taken += 1  # counted before the update: a step is never taken unaccounted
    optimizer.original_optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _check_same_parameters(clipped: list, optimised: list) -> None:
    """Book-keeping's noised mean gives every optimised parameter its clipped sum, or noise alone where it has
    none: a parameter the optimiser updates but book-keeping does not clip (or the reverse) would be silently
    wrong, so it is refused before any step."""
    unclipped = len({id(p) for p in optimised} - {id(p) for p in clipped})
    unoptimised = len({id(p) for p in clipped} - {id(p) for p in optimised})
    if unclipped or unoptimised:
        raise PrivacyConfigError(
            f"book-keeping clips other parameters than the optimiser updates: {unclipped} optimised but not "
            f"clipped, {unoptimised} clipped but not optimised (pass the optimiser exactly the trainable parameters)"
        )


def noised_mean(state: PrivateTraining, sums: dict) -> None:
    """p.grad = (clipped sum + N(0, sigma^2 C^2)) / B for every trainable parameter, B the expected batch size
    (per rank: the ranks' gradients are then averaged, and only rank 0 adds noise, as Opacus's distributed
    optimiser does). The clipped sum comes as terms (``bookkeeping.add_terms``; absent: no example). Drawn at std
    sigma C / B, with each term added in with weight 1 / B (kept per-example gradients by one product into the
    noise), it costs 3 passes over the parameter where Opacus's pre-step (copy, zeroed buffer, noise, sum,
    division) plus forming the sum cost ~12; same distribution, same generator, in the parameters' order."""
    optimizer = state.optimizer
    if optimizer.secure_mode or optimizer.loss_reduction != "mean" or optimizer.step_hook is not None:
        raise NotImplementedError(
            "book-keeping's noised mean is Opacus's mean reduction with plain Gaussian noise: no secure mode, "
            "no step hook"
        )
    scale = 1.0 / (optimizer.expected_batch_size * optimizer.accumulated_iterations)
    std = optimizer.noise_multiplier * optimizer.max_grad_norm * scale
    noised = state.rank == 0 and std > 0
    with torch.no_grad():
        for p in optimizer.params:
            terms = sums.pop(p, [])
            if noised:
                grad = torch.normal(
                    0.0, std, size=p.shape, generator=optimizer.generator, device=p.device, dtype=p.dtype
                )
                for term in terms:
                    bookkeeping.add_term(grad, term, alpha=scale)
            elif terms:
                grad = bookkeeping.formed(terms, alpha=scale).view_as(p).to(p.dtype)
            else:
                grad = torch.zeros_like(p)
            p.grad = grad


def _release_accumulators(optimizer) -> None:
    """Drop what the noised ``p.grad`` was built from before the update. Opacus keeps ``p.summed_grad`` (one
    parameter-sized copy each) and, with hooks, ``p.grad_sample`` (one per example) until ``zero_grad``: beside the
    optimiser's own temporaries they made the update the step's memory peak."""
    for p in optimizer.params:
        p.summed_grad = None
        p.grad_sample = None


def _add_public_gradient(state: PrivateTraining, public_grad_fn: Callable[[], None]) -> None:
    # The per-sample hooks must not see this backward: its gradient depends on no private example and is added
    # to the already noised p.grad as is. (Book-keeping records only inside its own clipped_sum.)
    if state.clipping == "bookkeeping":
        public_grad_fn()
        return
    state.module.disable_hooks()
    try:
        public_grad_fn()
    finally:
        state.module.enable_hooks()


def _accumulate_clipped(
    state: PrivateTraining, part: torch.Tensor, loss_fn: ViewLossFn, *, into: dict | None = None
) -> None:
    """Forward/backward one physical chunk and leave per-example gradients (averaged over views) for clipping;
    book-keeping adds the chunk's clipped sum to ``into`` (``bookkeeping.add_terms``)."""
    if len(part) == 0:
        if state.clipping != "bookkeeping":  # book-keeping: nothing to add, the noised mean is noise alone
            _empty_chunk(state)
        return
    checked_losses = lambda: _checked(  # noqa: E731
        loss_fn(part), examples=len(part), k=state.privacy.augmentation_multiplicity
    )
    if state.clipping == "bookkeeping":
        # The broken test-only mechanism: an infinite clipping norm leaves every per-example gradient whole, while
        # the optimiser's noise (std sigma * C) stays that of the real mechanism.
        norm = math.inf if state.unsafe_skip_clipping else state.privacy.max_grad_norm
        if state.views_per_chunk is not None:
            for i in range(len(part)):
                _split_views_clipped(state, part[i : i + 1], loss_fn, max_grad_norm=norm, into=into)
            return
        state.module.clipped_sum(checked_losses, max_grad_norm=norm, into=into)
        return
    loss_bk = checked_losses()
    if state.clipping == "ghost":
        DPTensorFastGradientClipping(state.module, state.optimizer, loss_bk[:, 0], "mean").backward()
        return
    loss_bk.sum().backward()  # the hooks turn the per-view gradients into each example's view-mean gradient
    missing = [i for i, p in enumerate(state.optimizer.params) if p.grad_sample is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} trainable parameters received no per-sample gradient (not used in the forward?)"
        )


def _split_views_clipped(
    state: PrivateTraining, example: torch.Tensor, loss_fn: ViewLossFn, *, max_grad_norm: float, into: dict
) -> None:
    """Add one example's clipped view-mean gradient to ``into`` (a float32 term per parameter) where its k views
    take several forwards of ``state.views_per_chunk`` views. Plain backwards of (sum of a chunk's view losses) / k
    accumulate its gradient in ``p.grad``, which holds this example's alone; the clipping factor comes from its
    float32 norm over all trainable parameters, as book-keeping's does. Costs the non-DP step's products plus ~3
    passes over the trainable parameters per example (cheap beside k forwards); peak memory is one chunk's
    activations and two copies of the trainable parameters."""
    params, k, per = state.module.params, state.privacy.augmentation_multiplicity, state.views_per_chunk
    for p in params:  # nothing before this example may enter its gradient (the noised mean overwrites p.grad)
        p.grad = None
    for start in range(0, k, per):
        views = slice(start, min(k, start + per))
        loss_1v = _checked(loss_fn(example, views=views), examples=1, k=views.stop - views.start)
        (loss_1v.sum() / k).backward()
    missing = sum(p.grad is None for p in params)
    if missing:
        raise RuntimeError(
            f"{missing} trainable parameters received no gradient from an example's views (not used by the loss?)"
        )
    with torch.no_grad():
        grads = [p.grad.float() for p in params]
        for p in params:
            p.grad = None
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        c = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for p, grad in zip(params, grads, strict=True):
            into.setdefault(p, []).append(grad.mul_(c))


def _checked(loss_bk: torch.Tensor, *, examples: int, k: int) -> torch.Tensor:
    if loss_bk.ndim != 2 or tuple(loss_bk.shape) != (examples, k):
        raise ValueError(
            f"loss_fn must return per-view losses [b={examples}, k={k}], got {list(loss_bk.shape)}"
        )
    return loss_bk


def _empty_chunk(state: PrivateTraining) -> None:
    # An empty Poisson batch still takes a (pure noise) step: skipping it would change the privacy analysis.
    for p in state.optimizer.params:
        if state.clipping == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)


def _rng_note(seeded_by_caller: bool) -> str:
    return (
        "caller-seeded (reproducible; not for a real release)"
        if seeded_by_caller
        else "seeded from OS entropy (torch generator, not cryptographic)"
    )


# What a DP training run releases without noise, by where it appears in a result record (``privacy_ledger`` and
# ``trial.run_trial`` add these to the ledger): the guarantee covers the model and every figure computed from it or
# from public quantities, not these. Leave them out of a release that must be DP in the strict sense.
RELEASED_WITHOUT_NOISE = {
    "privacy.dataset_size": "N, the number of training examples",
    "history[].seconds, cost.train_seconds, cost.rows_per_second, cost.mfu": "training wall-clock times: a step takes longer on a larger Poisson batch",
    "cost.peak_memory_bytes": "peak memory: it grows with the largest physical chunk, which is smaller than resources.rows_per_forward only on small batches",
}


UNSAFE_CLIPPING_NOTE = "skipped (test-only broken mechanism: the epsilon below does not hold)"


def privacy_ledger(state: PrivateTraining) -> dict:
    """What the trial spent, for the result file. No per-example quantity and no actual batch size appears here
    (the accounting needs only the number of steps); ``released_without_noise`` names what is released outside
    the guarantee."""
    settings = dict(
        noise_multiplier=state.noise_multiplier,
        sampling_rate=state.privacy.sampling_rate,
        steps=state.steps,
        delta=state.delta,
    )
    spent = epsilon_spent(**settings, accountants=("rdp",))
    if state.privacy.accountant == "prv" or spent["rdp"] <= PRV_MAX_EPSILON:
        spent |= epsilon_spent(**settings, accountants=("prv",))
    return {
        "ledger_version": LEDGER_VERSION,
        "epsilon_rdp": spent["rdp"],
        **({"epsilon_prv": spent["prv"]} if "prv" in spent else {}),
        "target_epsilon": state.privacy.target_epsilon,
        "delta": state.delta,
        "noise_multiplier": state.noise_multiplier,
        "sampling_rate": state.privacy.sampling_rate,
        "steps": state.steps,
        "planned_steps": state.planned_steps,
        "dataset_size": state.dataset_size,
        "expected_batch_size": state.expected_batch_size,
        "max_grad_norm": state.privacy.max_grad_norm,
        "augmentation_multiplicity": state.privacy.augmentation_multiplicity,
        "clipping": UNSAFE_CLIPPING_NOTE if state.unsafe_skip_clipping else state.clipping,
        "calibration_accountant": state.privacy.accountant,
        "world_size": state.world_size,
        "noise_rng": _rng_note(state.noise_seeded_by_caller),
        "sampling_rng": _rng_note(state.sampling_seeded_by_caller),
        "example_rng": (
            "keyed BLAKE2b + murmur3 per (step, example), key "
            + (
                "from the caller's sampling seed (reproducible; not for a real release)"
                if state.sampling_seeded_by_caller
                else "from OS entropy, never stored"
            )
        ),
        "released_without_noise": dict(RELEASED_WITHOUT_NOISE),
        "accountants": {
            "rdp": f"opacus {opacus.__version__} RDPAccountant, orders {RDP_ORDERS[0]}..{RDP_ORDERS[-1]} ({len(RDP_ORDERS)})",
            "prv": f"opacus {opacus.__version__} PRVAccountant"
            if "prv" in spent
            else f"not run: the RDP epsilon is above {PRV_MAX_EPSILON:g} (see trainables.privacy.PRV_MAX_EPSILON)",
        },
    }
