"""Training-side fast paths of issue 16, each against the eager path on CPU: the per-scale attention kernel (and
flex's forward) against the masked one, gradient accumulation (``resources.rows_per_forward``) against the one-shot
step, compiled blocks against eager ones, fused AdamW against the default, and the resources fields that select
them (validated, outside the trial id)."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_VAR, TINY_VQVAE
from torch.nn.attention.flex_attention import flex_attention
from torch.utils._python_dispatch import TorchDispatchMode

from bench.schema import (
    ATTENTION_KERNEL_CHOICES,
    MAX_SEED,
    ConfigError,
    EvaluationConfig,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
    TrialConfig,
    replace,
)
from bench.sweeps import build_sweep
from bench.sweeps.common import smoke_version
from trainables.data.tokens import TokenViews
from trainables.draws import ExampleKey
from trainables.finetune import (
    Prior,
    RunPlan,
    _StepDraws,
    _StepInputs,
    accumulate_loss_gradients,
    check_resources,
    examples_per_forward,
    finetune,
)
from trainables.methods import adapt, trainable_parameters
from trainables.models import ATTENTION_KERNELS, build_var, build_vqvae
from trainables.models.var import (
    AdaLNSelfAttn,
    ScaleBlocks,
    _scale_pieces,
    modulate,
    query_gain,
    scale_causal_attention,
    split_heads,
    unit_vectors,
)
from trainables.patches import QKVBias, _qkv_bias_grad_sample, attention_parameters_as_modules
from trainables.prior import build_prior_bank
from trainables.privacy import PrivacyConfigError, make_private, private_step, release
from trainables.training import (
    build_optimizer,
    compile_blocks,
    load_optimizer_state,
    uncompile_blocks,
    var_training_step,
    view_losses,
    views_per_forward,
)

sys.path.insert(0, str(REPO / "scripts"))
from benchmark_dp_memory import CudaAutocast, Traffic

# float32 on CPU: the kernels sum the same products in another order. Measured differences are ~1e-7 relative
# (logits) and ~1e-6 relative (gradients); a wrong mask or a lost chunk weight moves them by 1e-2 or more.
LOGITS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
METHODS = ("full", "lora", "ln_tuning")
GREEDY = EvaluationConfig(extractor="substitute-randconv-v1", top_k=0, top_p=0.0)  # the prior bank's sampling
DP = PrivacyConfig(target_epsilon=8.0, sampling_rate=0.05, max_grad_norm=1.0)


def trial(**sections) -> TrialConfig:
    """A valid trial config (the substitute extractor needs no weights file) with ``sections`` replaced."""
    return TrialConfig(**{"evaluation": GREEDY, **sections})


@pytest.fixture(scope="module")
def vqvae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vqvae(**TINY_VQVAE).eval()


def adapted(method: str, *, kernel: str = "masked", drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A tiny VAR adapted for ``method`` (3 classes, seed 0), in training mode, running ``kernel``."""
    var = build_var(**TINY_VAR, drop_path_rate=drop_path_rate, generator=torch.Generator().manual_seed(0))
    # Modulation of order 1 (the init's gammas are ~1e-3, so attention moved the logits by ~1e-6, inside
    # LOGITS_TOL: a kernel that masked nothing passed the logits comparison).
    with torch.no_grad():
        for block in var.blocks:
            block.ada_lin[-1].weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    adapt(var, MethodConfig(name=method, lora_rank=4), num_classes=3, seed=0)
    # A fresh LoRA adapter's B is zero: its A would get no gradient. Move B off zero so every gradient is tested.
    with torch.no_grad():
        for name, p in var.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    var.attention_kernel = kernel
    return var.train()


def batch(size: int = 6, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(labels [B], token maps [B, pn*pn] of every scale)."""
    g = torch.Generator().manual_seed(seed)
    label_B = torch.randint(0, 3, (size,), generator=g)
    return label_B, [torch.randint(0, 64, (size, pn * pn), generator=g) for pn in TINY_VAR["patch_nums"]]


def gradients(var: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in trainable_parameters(var).items()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    return {name: g.clone() for name, g in grads.items()}


def assert_same_gradients(got: dict, expected: dict, tol: dict = GRAD_TOL) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tol, msg=lambda m: f"{name}: {m}")  # noqa: B023


def step_gradients(var, vqvae, label_B, idx_Bl) -> dict[str, torch.Tensor]:
    """The gradients of one real training step (``var_training_step``; AdamW then moves the weights)."""
    var_training_step(var, vqvae, build_optimizer(var, lr=1e-3), label_B, idx_Bl, class_dropout=0.0)
    return gradients(var)


# --- attention kernels --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_per_scale_attention_trains_like_the_masked_kernel(method, vqvae):
    label_B, idx_Bl = batch()
    x_BLCv = vqvae.idxBl_to_var_input(idx_Bl)
    models = {kernel: adapted(method, kernel=kernel) for kernel in ("masked", "per_scale")}
    with torch.no_grad():
        torch.testing.assert_close(
            models["per_scale"](label_B, x_BLCv), models["masked"](label_B, x_BLCv), **LOGITS_TOL
        )
    expected = step_gradients(models["masked"], vqvae, label_B, idx_Bl)
    assert_same_gradients(step_gradients(models["per_scale"], vqvae, label_B, idx_Bl), expected)


def dp_step_gradients(
    var, vqvae, *, clipping: str = "bookkeeping", views: int = 2
) -> dict[str, torch.Tensor]:
    """The noiseless clipped gradient sum of one DP step (sigma 0, caller-seeded sampling; C small enough that
    every example is clipped), read off an SGD step of learning rate 1. ``views``: 1 or 2 per example (ghost
    clipping takes one)."""
    label_N, idx_Nl = batch(size=8, seed=2)
    privacy = PrivacyConfig(
        target_epsilon=10.0,
        sampling_rate=0.5,
        max_grad_norm=1e-3,
        augmentation_multiplicity=views,
        clipping=clipping,
    )
    before = {n: p.detach().clone() for n, p in trainable_parameters(var).items()}
    state = make_private(
        var,
        torch.optim.SGD(list(before and trainable_parameters(var).values()), lr=1.0),
        privacy=privacy,
        resources=ResourcesConfig(rows_per_forward=6),
        dataset_size=8,
        planned_steps=2,
        noise_multiplier=0.0,
        debug_seed=0,
    )

    def view_loss(indices: torch.Tensor) -> torch.Tensor:  # view 2: the token maps rolled by one position
        idx = [torch.stack([t[indices], t[indices].roll(1, dims=1)][:views], dim=1) for t in idx_Nl]
        return view_losses(var, vqvae, label_N[indices], idx, class_dropout=0.0)

    try:
        private_step(state, torch.arange(8), view_loss)
    finally:
        release(state)
    return {n: before[n] - p.detach() for n, p in trainable_parameters(var).items()}


def assert_same_readouts(got: dict, expected: dict, var: torch.nn.Module) -> None:
    """Compare two ``dp_step_gradients``. Each entry is read off an SGD update (before - after), whose rounding to
    float32 leaves it known to half an ulp of its weight, so a tensor's absolute tolerance is two ulps of its
    largest weight (5e-9 for a 0.02-scale LoRA B against clipped entries of ~1e-6), not a fixed 1e-9 that one
    rounding of such a weight can exceed."""
    weights = trainable_parameters(var)
    for name in expected:
        atol = 2 * torch.finfo(torch.float32).eps * float(weights[name].detach().abs().max())
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(
    ("method", "clipping", "views"),
    (("full", "bookkeeping", 2), ("lora", "bookkeeping", 2), ("lora", "hooks", 2), ("lora", "ghost", 1)),
)
def test_per_scale_attention_gives_the_masked_kernels_clipped_dp_step(method, clipping, views, vqvae):
    """Every clipping mode through the per-scale kernel's own backward (ghost clipping runs two backwards through
    one retained graph) against the masked kernel's."""
    expected = dp_step_gradients(adapted(method, kernel="masked"), vqvae, clipping=clipping, views=views)
    got = dp_step_gradients(var := adapted(method, kernel="per_scale"), vqvae, clipping=clipping, views=views)
    # Every example was clipped (sum of 8 clipped examples, scaled by 1/(q N) = 1/4): the sum's norm <= 8 C / 4.
    norm = torch.cat([g.flatten() for g in expected.values()]).norm()
    assert 0 < norm <= 8 * 1e-3 / 4 + 1e-9
    assert_same_readouts(got, expected, var)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
def test_flex_attention_forward_equals_the_masked_kernel(vqvae):
    label_B, idx_Bl = batch()
    x_BLCv = vqvae.idxBl_to_var_input(idx_Bl)
    masked, flex = adapted("full", kernel="masked").eval(), adapted("full", kernel="flex").eval()
    with torch.no_grad():
        torch.testing.assert_close(flex(label_B, x_BLCv), masked(label_B, x_BLCv), **LOGITS_TOL)


@pytest.mark.parametrize("patched", (False, True))
def test_the_qkv_bias_keeps_q_k_and_v_in_the_autocast_dtype(patched):
    """The published code adds the q/v biases inside ``F.linear``, so under autocast q, k and v are bf16; added as a
    float32 tensor after the module call (as LoRA and per-sample hooks need it) they were promoted to float32,
    twice the bytes through the norms and the casts into attention. Also through the DP patch's module."""
    var = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0))
    if patched:
        attention_parameters_as_modules(var)
    attention = var.blocks[0].attn
    assert (attention.qkv_bias is not None) == patched
    with torch.no_grad():  # (zero at build: give the add something to round)
        (attention.qkv_bias.q_bias if patched else attention.q_bias).normal_()
    x_BLC = torch.randn(2, 5, TINY_VAR["embed_dim"], generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qkv_BL3C = attention.add_qkv_bias(attention.mat_qkv(x_BLC))
    assert qkv_BL3C.dtype == torch.bfloat16
    expected = attention.add_qkv_bias(attention.mat_qkv(x_BLC))  # float32
    torch.testing.assert_close(qkv_BL3C.float(), expected, rtol=2e-2, atol=2e-2)


def test_the_qkv_bias_per_example_gradient_is_summed_in_float32():
    """Its bf16 backprops (under autocast) are summed over the positions in float32, not rounded to bf16."""
    C = 4
    layer = QKVBias(torch.nn.Parameter(torch.zeros(C)), torch.nn.Parameter(torch.zeros(C)))
    backprops_BL3C = torch.randn(2, 680, 3 * C, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    grads = _qkv_bias_grad_sample(layer, [], backprops_BL3C)
    exact_B3C = backprops_BL3C.double().sum(1)
    for param, columns in ((layer.q_bias, slice(0, C)), (layer.v_bias, slice(2 * C, 3 * C))):
        assert grads[param].dtype == torch.float32
        torch.testing.assert_close(grads[param].double(), exact_B3C[:, columns], rtol=1e-6, atol=1e-5)


def test_flex_attention_runs_at_the_autocast_precision_as_sdpa_does(monkeypatch):
    """Autocast casts SDPA's q, k and v to bf16 but has no rule for flex_attention, whose inputs the qkv bias
    leaves float32: uncast, the compiled CUDA kernel (the GPU benchmark's flex rows) ran attention in float32
    while labelled bf16. The eager CPU reference is made of autocast ops, so the kernel's inputs are checked."""
    import trainables.models.var as var_module

    seen = []

    def recording_flex(device_type: str):
        def flex(q, k, v, **kwargs):
            seen.append({q.dtype, k.dtype, v.dtype})
            return flex_attention(q, k, v, **kwargs)

        return flex

    monkeypatch.setattr(var_module, "_flex", recording_flex)
    var = build_var(**TINY_VAR)
    L, H = var.seq_len, TINY_VAR["num_heads"]
    g = torch.Generator().manual_seed(0)
    q_BHLc, k_BHLc, v_BHLc = (torch.randn(2, H, L, 32, generator=g) for _ in range(3))
    out = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kernel in ("masked", "flex"):
            var.attention_kernel = kernel
            mask = var.attention_mask(torch.device("cpu"))
            out[kernel] = scale_causal_attention(q_BHLc, k_BHLc, v_BHLc, mask=mask, scale=0.2)
    assert seen == [{torch.bfloat16}]
    assert out["flex"].dtype == out["masked"].dtype == torch.bfloat16
    torch.testing.assert_close(out["flex"].float(), out["masked"].float(), rtol=2e-2, atol=2e-2)


class _Recorder(TorchDispatchMode):
    """The names of the aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def sliced_reference(q_BHLc, k_BHLc, v_BHLc, ends, *, scale):
    """The per-scale kernel as plain autograd sees it: SDPA per scale on slices (autocast casts every slice)."""
    return torch.cat(
        [
            F.scaled_dot_product_attention(*qkv, scale=scale)
            for qkv in _scale_pieces((q_BHLc, k_BHLc, v_BHLc), ends)
        ],
        dim=2,
    )


def per_scale_run(attention, ends, *, autocast: bool, needs=(True, True, True), seed: int = 0):
    """(output [B, H, L, c] as float32, grads of q, k and v) of ``attention`` for a fixed upstream gradient; the
    inputs are float32 leaves, as the qkv bias leaves q, k and v under autocast."""
    g = torch.Generator().manual_seed(seed)
    L = ends[-1]
    qkv = [torch.randn(2, 3, L, 8, generator=g).requires_grad_(need) for need in needs]
    upstream_BHLc = torch.randn(2, 3, L, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out_BHLc = attention(*qkv, ends, scale=0.3)
    (out_BHLc.float() * upstream_BHLc).sum().backward()
    return out_BHLc, [t.grad for t in qkv]


def kernel_attention(q_BHLc, k_BHLc, v_BHLc, ends, *, scale):
    return scale_causal_attention(q_BHLc, k_BHLc, v_BHLc, mask=ScaleBlocks(tuple(ends)), scale=scale)


@pytest.mark.parametrize("autocast", (False, True))
def test_per_scale_attention_backward_equals_autograd_through_the_slices(autocast):
    """The kernel's own backward against autograd's through the sliced calls: the same output bits (the same SDPA
    calls on the same values) and the same gradients up to the order of the key and value sums (float32: a
    few ulps; under bf16 autocast both add bf16 per-scale gradients in float32). Gradients come back in the
    inputs' float32, as autocast's casts return them."""
    ends = (1, 5, 14, 30, 55, 91)
    out, grads = per_scale_run(kernel_attention, ends, autocast=autocast)
    expected_out, expected_grads = per_scale_run(sliced_reference, ends, autocast=autocast)
    assert out.dtype == expected_out.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, expected in zip(grads, expected_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_per_scale_attention_backward_writes_no_full_size_slice_gradients():
    """Autograd's backward of each slice is a zero-filled tensor of the whole input: 28 of them per block at ten
    scales (a whole-range slice makes none), and as many full-size adds, around kernels that compute less. The
    kernel's backward has none, and no zero-filled buffer either: the finest scale's key and value gradients
    start their sums, and q's rows are written once each."""
    ends = (1, 5, 14, 30, 55, 91)
    for attention, slices_expected in ((sliced_reference, True), (kernel_attention, False)):
        g = torch.Generator().manual_seed(0)
        qkv = [torch.randn(2, 3, ends[-1], 8, generator=g, requires_grad=True) for _ in range(3)]
        out = attention(*qkv, ends, scale=0.3)
        with _Recorder() as recorder:
            out.sum().backward()
        full_size = [op for op in recorder.ops if op.startswith(("slice_backward.", "zeros.", "new_zeros."))]
        if slices_expected:  # one per sliced q, k and v of every scale (a whole-range slice records none)
            assert full_size.count("slice_backward.default") >= 3 * (len(ends) - 1)
        else:
            assert full_size == []
            assert recorder.ops.count("add_.Tensor") == 2 * (
                len(ends) - 1
            )  # k and v: one add per coarser scale


def test_per_scale_attention_backward_returns_only_the_wanted_gradients():
    ends = (1, 5, 14, 30)
    _, grads = per_scale_run(kernel_attention, ends, autocast=False, needs=(False, False, True))
    _, expected = per_scale_run(sliced_reference, ends, autocast=False, needs=(False, False, True))
    assert grads[:2] == [None, None]
    torch.testing.assert_close(grads[2], expected[2], rtol=1e-6, atol=1e-6)


def test_per_scale_attention_backward_runs_again_through_a_retained_graph_only():
    """Opacus's ghost clipping runs a second backward through a retained graph: the kernel keeps each scale's graph
    for it. Without retain_graph the graph goes with the block's backward (kept to the end of the step it would
    raise the peak), and a second backward says so as autograd does."""
    ends = (1, 5, 14)
    qkv = [torch.randn(1, 2, ends[-1], 4, requires_grad=True) for _ in range(3)]
    loss = kernel_attention(*qkv, ends, scale=0.5).sum()  # (sum saves nothing: the kernel is what refuses)
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in qkv]
    loss.backward()
    for t, grad in zip(qkv, once, strict=True):
        torch.testing.assert_close(t.grad, 2 * grad)
    with pytest.raises(RuntimeError, match="backward through per-scale attention a second time"):
        loss.backward()


def test_per_scale_attention_accumulates_half_precision_gradients_in_float32():
    """Under CUDA autocast v reaches attention in bf16 (q and k come out of the norms in float32): its gradient, a
    sum over every scale that sees it, is accumulated in float32 and rounded once, not rounded at every add."""
    ends = (1, 5, 14, 30, 55, 91, 155)
    g = torch.Generator().manual_seed(3)
    q_BHLc, k_BHLc = (torch.randn(2, 3, ends[-1], 8, generator=g, requires_grad=True) for _ in range(2))
    v_BHLc = torch.randn(2, 3, ends[-1], 8, generator=g).to(torch.bfloat16).requires_grad_()
    upstream_BHLc = torch.randn(2, 3, ends[-1], 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_BHLc = kernel_attention(q_BHLc, k_BHLc, v_BHLc, ends, scale=0.3)
    (out_BHLc.float() * upstream_BHLc).sum().backward()
    # The same kernels on the same bf16 pieces, their v gradients summed in float32 once, or in bf16 one by one
    # (finest scale first, as the kernel adds them).
    pieces = list(_scale_pieces([t.detach().to(torch.bfloat16) for t in (q_BHLc, k_BHLc, v_BHLc)], ends))
    float32_sum, bf16_sum = torch.zeros(v_BHLc.shape), torch.zeros(v_BHLc.shape, dtype=torch.bfloat16)
    for (q, k, v), start, end in reversed(list(zip(pieces, (0, *ends[:-1]), ends, strict=True))):
        v = v.detach().requires_grad_()
        upstream = upstream_BHLc[:, :, start:end].to(torch.bfloat16)
        (grad,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, scale=0.3), v, upstream)
        float32_sum[:, :, :end] += grad
        bf16_sum[:, :, :end] += grad
    assert v_BHLc.grad.dtype == torch.bfloat16
    torch.testing.assert_close(v_BHLc.grad, float32_sum.to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(v_BHLc.grad, bf16_sum)  # the test tells the two apart


def test_per_scale_attention_writes_a_bf16_query_s_gradient_once_without_a_float32_buffer():
    """Under autocast the unit queries and keys reach attention in bf16 (``unit_vectors(dtype=...)``). Each row of
    q's gradient is one scale's: written straight into a bf16 buffer (the same bits as through float32), while
    k's and v's, sums over scales, are accumulated in float32 and rounded once (the rows only the finest scale
    sees are that scale's gradient as it came)."""
    ends = (1, 5, 14, 30, 55)
    g = torch.Generator().manual_seed(4)
    qkv = [torch.randn(2, 3, ends[-1], 8, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    upstream_BHLc = torch.randn(2, 3, ends[-1], 8, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_BHLc = kernel_attention(*qkv, ends, scale=0.3)
    with _Recorder() as recorder:  # autograd.grad: no accumulation into .grad among the ops recorded
        grads = torch.autograd.grad(out_BHLc, qkv, upstream_BHLc)
    pieces = list(_scale_pieces([t.detach() for t in qkv], ends))
    expected_q = torch.cat(
        [
            torch.autograd.grad(
                F.scaled_dot_product_attention(q.requires_grad_(), k, v, scale=0.3),
                q,
                upstream_BHLc[:, :, s:e],
            )[0]
            for (q, k, v), s, e in zip(pieces, (0, *ends[:-1]), ends, strict=True)
        ],
        dim=2,
    )
    assert all(grad.dtype == torch.bfloat16 for grad in grads) and torch.equal(grads[0], expected_q)
    # q: a bf16 buffer, its rows copied in once each, no float32 one and no cast after it. k and v: the finest
    # scale's gradients kept as they come, one float32 sum each over the rows coarser scales see (started by one
    # widening add, not a float32 copy of every row) and copied once into those rows: no cast of a whole gradient.
    assert recorder.ops.count("new_empty.default") == 3 and recorder.ops.count("addcmul.out") == 2
    assert "_to_copy.default" not in recorder.ops and recorder.ops.count("copy_.default") == len(ends) + 2


def test_per_scale_attention_refuses_a_double_backward():
    """Its backward sums outside autograd; a create_graph backward would silently lose the second derivative."""
    ends = (1, 5, 14)
    qkv = [torch.randn(1, 2, ends[-1], 4, requires_grad=True) for _ in range(3)]
    out = kernel_attention(*qkv, ends, scale=0.5).square().sum()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out, qkv, create_graph=True)


def unit_vectors_run(normalize, x_BHLc, upstream_BHLc, *, autocast: bool):
    """(F.normalize-like output, x's gradient) for an upstream gradient given in float32."""
    x_BHLc = x_BHLc.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_BHLc = normalize(x_BHLc)
    y_BHLc.backward(upstream_BHLc.to(y_BHLc.dtype))
    return y_BHLc.detach(), x_BHLc.grad


@pytest.mark.parametrize(
    "dtype, autocast, tol",
    # float32: another order of the same float32 operations; bf16 (a model held in bf16, or q and k under autocast):
    # both round the gradient to bf16 (1 ulp = 2^-8 relative), each as far from the float64 one (checked below).
    [
        (torch.float32, False, 1e-6),
        (torch.float32, True, 1e-6),
        (torch.bfloat16, False, 1e-2),
        (torch.bfloat16, True, 1e-2),
    ],
)
def test_unit_vectors_equal_f_normalize_forward_bit_for_bit_and_backward_to_rounding(dtype, autocast, tol):
    g = torch.Generator().manual_seed(0)
    x_BHLc = torch.randn(2, 3, 91, 16, generator=g).to(dtype)
    x_BHLc[0, 0, :3] = torch.tensor([0.0, 1e-14, 1e-12])[
        :, None
    ]  # a zero row, a row below eps, one just above
    upstream_BHLc = torch.randn(2, 3, 91, 16, generator=g)
    ours, ours_grad = unit_vectors_run(unit_vectors, x_BHLc, upstream_BHLc, autocast=autocast)
    theirs, theirs_grad = unit_vectors_run(
        lambda x: F.normalize(x, dim=-1), x_BHLc, upstream_BHLc, autocast=autocast
    )
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert ours_grad.dtype == theirs_grad.dtype == dtype
    # Rows at and below eps have gradients of 1e12 (g / eps): compared relative to each row's scale.
    scale_BHL1 = theirs_grad.abs().amax(-1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(ours_grad / scale_BHL1, theirs_grad / scale_BHL1, rtol=0, atol=tol)
    exact = x_BHLc.double().requires_grad_()
    F.normalize(exact, dim=-1).backward(upstream_BHLc.to(theirs.dtype).double())
    ours_error, theirs_error = (
        (grad.double() - exact.grad) / scale_BHL1 for grad in (ours_grad, theirs_grad)
    )
    assert ours_error.abs().max() <= 1.5 * theirs_error.abs().max() + 1e-12


@pytest.mark.parametrize("autocast", (False, True))
def test_unit_queries_with_the_gain_folded_in_equal_the_published_normalise_then_scale(autocast):
    """With the queries' gain, x * (gain / norm) in one pass against (x / norm) * gain: values to a float32 rounding
    (under CUDA's autocast, replayed here, a bf16 q gives float32 queries in both; CPU autocast would round the
    published unit vectors to bf16 first), gradients of q and of the learned scale too."""
    attention = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0)).blocks[0].attn
    with torch.no_grad():
        attention.scale_mul_1H11.add_(torch.linspace(-0.5, 5.0, TINY_VAR["num_heads"]).view(1, -1, 1, 1))
    g = torch.Generator().manual_seed(1)
    q_BHLc = torch.randn(2, TINY_VAR["num_heads"], 30, 8, generator=g).to(
        torch.bfloat16 if autocast else torch.float32
    )
    upstream_BHLc = torch.randn(q_BHLc.shape, generator=g)
    results = []
    published = lambda q: F.normalize(q, dim=-1) * query_gain(attention.scale_mul_1H11)  # noqa: E731
    for queries in (attention.unit_queries, published):
        q = q_BHLc.clone().requires_grad_()
        with CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out_BHLc = queries(q)
        grads = torch.autograd.grad(out_BHLc, (q, attention.scale_mul_1H11), upstream_BHLc.to(out_BHLc.dtype))
        results.append((out_BHLc, *grads))
    (ours, *ours_grads), (published, *published_grads) = results
    assert ours.dtype == published.dtype
    torch.testing.assert_close(ours, published, rtol=1e-6, atol=1e-6)
    # q's gradient in q's dtype (bf16: up to one ulp apart, 2^-7 of the largest); the scale's summed in float32.
    largest = published_grads[0].abs().max().item()
    tol = 2**-7 * largest if autocast else 1e-6 * largest
    torch.testing.assert_close(ours_grads[0].float(), published_grads[0].float(), rtol=0, atol=tol)
    torch.testing.assert_close(ours_grads[1], published_grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_gain", (False, True))
def test_unit_vectors_in_the_attention_s_dtype_are_the_cast_of_the_float32_ones_with_the_same_gradients(
    with_gain,
):
    """Under (CUDA's, replayed) autocast, a bf16 q or k normalised straight into bf16 gives the bits the attention's
    cast of the float32 unit vectors gave, and, for the same bf16 gradient, bit for bit the gradients of x and of
    the gain that came through the cast's backward (a float32 copy of that gradient). Fails for a bf16 product of
    the gradient and x in the backward (rounded before its float32 sum), or a bf16 norm."""
    g = torch.Generator().manual_seed(2)
    x_BHLc = torch.randn(2, 3, 91, 16, generator=g).to(torch.bfloat16)
    x_BHLc[0, 0, :3] = torch.tensor([0.0, 1e-14, 1e-12])[:, None]  # a zero row, a row below eps, one above
    gain_1H11 = (torch.rand(1, 3, 1, 1, generator=g) * 10 + 1) if with_gain else None
    upstream_BHLc = torch.randn(x_BHLc.shape, generator=g).to(torch.bfloat16)
    results = []
    for dtype in (None, torch.bfloat16):
        x = x_BHLc.clone().requires_grad_()
        gain = None if gain_1H11 is None else gain_1H11.clone().requires_grad_()
        with CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
            y_BHLc = unit_vectors(x, gain, dtype=dtype).to(torch.bfloat16)  # the attention's cast
        leaves = [t for t in (x, gain) if t is not None]
        results.append((y_BHLc, *torch.autograd.grad(y_BHLc, leaves, upstream_BHLc)))
    (cast, *cast_grads), (ours, *ours_grads) = results
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, cast)
    assert all(torch.equal(o, c) for o, c in zip(ours_grads, cast_grads, strict=True))
    assert ours_grads[0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("unused", (None, 1))
def test_split_heads_gives_the_views_and_autograd_s_gradients_bit_for_bit(dtype, unused):
    """q, k and v [B, H, L, c] out of qkv [B, L, 3C], and qkv's gradient written into one tensor: autograd's
    through the view, permute and unbind, bit for bit, also where one of the three gets no gradient."""
    g = torch.Generator().manual_seed(4)
    qkv_BL3C = torch.randn(2, 13, 3 * 4 * 8, generator=g).to(dtype)
    upstream = [torch.randn(2, 4, 13, 8, generator=g).to(dtype) for _ in range(3)]
    results = []
    for ours in (False, True):
        qkv = qkv_BL3C.clone().requires_grad_()
        if ours:
            pieces = split_heads(qkv, 4)
        else:
            pieces = qkv.view(2, 13, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        used = [(p * u).sum() for i, (p, u) in enumerate(zip(pieces, upstream, strict=True)) if i != unused]
        (grad,) = torch.autograd.grad(sum(used), [qkv])
        results.append((pieces, grad))
    (plain, plain_grad), (pieces, grad) = results
    assert all(torch.equal(p, q) and p.shape == (2, 4, 13, 8) for p, q in zip(pieces, plain, strict=True))
    assert grad.dtype == dtype and grad.is_contiguous() and torch.equal(grad, plain_grad)


def test_split_heads_writes_qkv_s_gradient_in_one_pass():
    """Counted: autograd stacks the three gradients and then copies the stack into qkv's layout (4 + 4 bytes per
    bf16 entry); ``split_heads`` writes each into place once (4)."""
    qkv_BL3C = torch.randn(2, 64, 3 * 4 * 16).bfloat16()
    upstream = torch.randn(3, 2, 4, 64, 16).bfloat16()
    moved = {}
    for ours in (False, True):
        qkv = qkv_BL3C.clone().requires_grad_()
        pieces = split_heads(qkv, 4) if ours else qkv.view(2, 64, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        with Traffic() as traffic:
            torch.autograd.backward(pieces, list(upstream))
        moved[ours] = traffic.bytes
    assert moved[False] - moved[True] == 4 * qkv_BL3C.numel()


def test_a_patched_head_scale_writes_the_attention_s_dtype_under_autocast():
    var = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0))
    attention_parameters_as_modules(var)
    attention = var.blocks[0].attn
    attention.head_scale.register_forward_hook(lambda module, args, out: None)  # as DP's hooks: not folded
    q_BHLc = torch.randn(1, TINY_VAR["num_heads"], 5, 8, requires_grad=True)
    with CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.unit_queries(q_BHLc, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert attention.unit_queries(q_BHLc).dtype == torch.float32


def test_a_patched_head_scale_sees_its_own_call_and_gets_each_row_s_gain_gradient():
    """DP's per-sample gradients of the scale come from the patch module's own call: it gives the gain per row
    [B, H, 1, 1], holding no activation (its input is an empty [B, 0]), and the gradient reaching it is each row's
    gain gradient, which sums to the scale's gradient through the unpatched attention."""
    var = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0))
    attention = var.blocks[0].attn
    with torch.no_grad():
        attention.scale_mul_1H11.add_(torch.randn(attention.scale_mul_1H11.shape))
    H, g = TINY_VAR["num_heads"], torch.Generator().manual_seed(1)
    q_BHLc = torch.randn(3, H, 5, 8, generator=g)
    upstream_BHLc = torch.randn(q_BHLc.shape, generator=g)
    attention.unit_queries(q_BHLc.clone().requires_grad_()).backward(upstream_BHLc)
    unpatched = attention.scale_mul_1H11.grad.clone()
    attention_parameters_as_modules(var)
    seen = []

    def hook(module, args, out):
        seen.append(args[0].shape)
        out.register_hook(seen.append)

    attention.head_scale.register_forward_hook(hook)
    attention.head_scale.scale_mul_1H11.grad = None
    attention.unit_queries(q_BHLc.clone().requires_grad_()).backward(upstream_BHLc)
    rows, per_row_gain_grad = seen
    assert rows == torch.Size([3, 0]) and per_row_gain_grad.shape == (3, H, 1, 1)
    s_1H11 = attention.head_scale.scale_mul_1H11
    torch.testing.assert_close((per_row_gain_grad * query_gain(s_1H11)).sum(0, keepdim=True), unpatched)
    torch.testing.assert_close(s_1H11.grad, unpatched)


def test_unit_vectors_backward_passes_gradcheck_and_refuses_a_double_backward():
    g = torch.Generator().manual_seed(1)
    x_BHLc = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=g)
    gain_1H11 = torch.rand(1, 2, 1, 1, dtype=torch.float64, generator=g) + 0.5
    # (The eps branch, a constant divisor, is compared with F.normalize above: finite differences of a zero row
    # step out of it.)
    assert torch.autograd.gradcheck(unit_vectors, (x_BHLc.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(unit_vectors, (x_BHLc.requires_grad_(), gain_1H11.requires_grad_()))
    y = unit_vectors(x_BHLc)
    (grad,) = torch.autograd.grad(y.square().sum() + y.sum(), x_BHLc, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        grad.sum().backward()


def test_flex_attention_cannot_train_on_a_cpu_and_is_refused_first():
    with pytest.raises(ConfigError, match="resources.attention_kernel.*CPU"):
        check_resources(ResourcesConfig(attention_kernel="flex"), device="cpu", privacy=None)
    check_resources(ResourcesConfig(attention_kernel="flex"), device="cuda", privacy=None)  # a GPU may
    data, vqvae, var = token_setup()
    with pytest.raises(ConfigError, match="resources.attention_kernel"):
        finetune(
            var,
            vqvae,
            data,
            optimization=OptimizationConfig(steps=1, batch_size=4),
            method=MethodConfig(name="lora", lora_rank=4),
            plan=RunPlan(planned_steps=1),
            resources=ResourcesConfig(attention_kernel="flex"),
        )
    assert var.attention_kernel == "masked"  # refused before anything was set up


# --- gradient accumulation --------------------------------------------------------------------------------
def token_setup(examples: int = 16, views: int = 2):
    """(token views of random examples with ``views`` views each, a tiny VQVAE, a LoRA-adapted tiny VAR)."""
    g = torch.Generator().manual_seed(0)
    data = TokenViews(
        torch.randint(0, 3, (examples,), generator=g),
        tuple(torch.randint(0, 64, (examples, views, pn * pn), generator=g) for pn in TINY_VAR["patch_nums"]),
    )
    torch.manual_seed(0)
    vqvae = build_vqvae(**TINY_VQVAE).eval()
    var = build_var(**TINY_VAR, drop_path_rate=0.1, generator=torch.Generator().manual_seed(0))
    adapt(var, MethodConfig(name="lora", lora_rank=4), num_classes=3, seed=0)
    return data, vqvae, var.train()


def step_inputs(var, vqvae, data, *, k: int) -> _StepInputs:
    """What a finetune step's losses read, with class dropout and drop-path drawn per example (so a chunked
    forward draws what the one-shot forward draws)."""
    inputs = _StepInputs(
        var=var,
        vqvae=vqvae,
        data=data,
        device=torch.device("cpu"),
        views_per_example=k,
        class_dropout=0.5,
        token_weights_L=None,
        bf16=False,
        seed=0,
        prior=None,
        prior_weight=0.0,
        prior_batch_size=4,
        draws=_StepDraws(key=ExampleKey.from_seed(0)),
    )
    inputs.begin_step(3)
    return inputs


def test_the_largest_seed_a_trial_accepts_seeds_the_prior_s_draws():
    """The prior's per-step generator seed is a product of the trial seed (it overflowed from a seed of ~2**24)."""
    data, vqvae, var = token_setup()
    inputs = step_inputs(var, vqvae, data, k=1)
    inputs.seed = MAX_SEED
    inputs.begin_step(10**6)
    first = torch.rand(3, generator=inputs.prior_generator)
    inputs.begin_step(10**6)
    assert torch.equal(torch.rand(3, generator=inputs.prior_generator), first)


@pytest.mark.parametrize("k", (1, 2))
def test_accumulated_gradients_equal_the_one_shot_gradients(k):
    data, vqvae, var = token_setup()
    inputs, indices = step_inputs(var, vqvae, data, k=k), torch.tensor([5, 0, 11, 3, 8, 14, 2])
    losses = {}
    grads = {}
    for rows in (0, 3 * k, 2 * k + 1, k):  # all at once; 3 examples (7 = 3 + 3 + 1); 2 examples; 1 example
        var.zero_grad(set_to_none=True)
        chunk = examples_per_forward(rows, views_per_example=k)
        losses[rows] = accumulate_loss_gradients(inputs.view_losses, indices, examples_per_forward=chunk)
        grads[rows] = gradients(var)
    for rows in (3 * k, 2 * k + 1, k):
        torch.testing.assert_close(losses[rows], losses[0], rtol=1e-6, atol=1e-7)
        assert_same_gradients(grads[rows], grads[0])


def test_rows_per_forward_must_hold_one_example_unless_book_keeping_splits_its_views():
    assert examples_per_forward(0, views_per_example=2) is None
    assert examples_per_forward(5, views_per_example=2) == 2
    with pytest.raises(
        ConfigError, match="resources.rows_per_forward.*1 rows cannot hold one example's 2 views"
    ):
        examples_per_forward(1, views_per_example=2)
    assert examples_per_forward(1, views_per_example=2, splits_views=True) == 1
    assert examples_per_forward(5, views_per_example=2, splits_views=True) == 2
    assert [views_per_forward(rows, views_per_example=4) for rows in (0, 1, 3, 4, 9)] == [
        None,
        1,
        3,
        None,
        None,
    ]
    with pytest.raises(ConfigError, match="resources.rows_per_forward"):
        ResourcesConfig(rows_per_forward=-1)
    with pytest.raises(ConfigError, match="resources.rows_per_forward"):
        ResourcesConfig(rows_per_forward=2.0)
    # Under DP too (it chunks the Poisson batches): with Opacus's clipping an example's k views share a forward;
    # book-keeping ("auto" for an adapted VAR) spreads them over forwards.
    dp_k3 = dataclasses.replace(DP, augmentation_multiplicity=3)
    assert trial(privacy=DP, resources=ResourcesConfig(rows_per_forward=64)).resources.rows_per_forward == 64
    for clipping in ("auto", "bookkeeping", "hooks"):
        check_resources(
            ResourcesConfig(rows_per_forward=3),
            device="cpu",
            privacy=dataclasses.replace(dp_k3, clipping=clipping),
        )
    for clipping in ("auto", "bookkeeping"):
        check_resources(
            ResourcesConfig(rows_per_forward=2),
            device="cpu",
            privacy=dataclasses.replace(dp_k3, clipping=clipping),
        )
    with pytest.raises(  # naming the clipping and the way out, as the schema's refusal does
        ConfigError,
        match=r"resources.rows_per_forward: 2 rows cannot hold one example's 3 views, which share a forward with "
        r"privacy.clipping='hooks': use 0, at least k, or clipping in \('auto', 'bookkeeping'\)",
    ):
        check_resources(
            ResourcesConfig(rows_per_forward=2),
            device="cpu",
            privacy=dataclasses.replace(dp_k3, clipping="hooks"),
        )


def split_views_setup(method: str, *, views: int):
    """(token views of 8 examples with ``views`` cached views each, a tiny VQVAE, a tiny VAR adapted by ``method``
    with drop-path), built alike on every call."""
    g = torch.Generator().manual_seed(0)
    data = TokenViews(
        torch.randint(0, 3, (8,), generator=g),
        tuple(torch.randint(0, 64, (8, views, pn * pn), generator=g) for pn in TINY_VAR["patch_nums"]),
    )
    torch.manual_seed(0)
    vqvae = build_vqvae(**TINY_VQVAE).eval()
    var = build_var(**TINY_VAR, drop_path_rate=0.3, generator=torch.Generator().manual_seed(0))
    adapt(var, MethodConfig(name=method, lora_rank=4), num_classes=3, seed=0)
    return data, vqvae, var.train()


def split_views_step(method: str, *, rows: int, k: int, max_grad_norm: float, examples=range(8)):
    """The noiseless clipped gradient sum of one DP step over ``examples`` of 8 with k of 6 views each (per-example
    keyed views, class dropout and drop-path), its forwards holding ``rows`` rows, read off an SGD step of learning
    rate 1 and divided by nothing (the noised mean's 1 / B of the expected batch B = 4 stays in): ({name: update},
    the model, the state's views per forward)."""
    data, vqvae, var = split_views_setup(method, views=6)
    inputs = step_inputs(var, vqvae, data, k=k)
    before = {n: p.detach().clone() for n, p in trainable_parameters(var).items()}
    privacy = PrivacyConfig(
        target_epsilon=10.0,
        sampling_rate=0.5,
        max_grad_norm=max_grad_norm,
        augmentation_multiplicity=k,
    )
    state = make_private(
        var,
        torch.optim.SGD(list(trainable_parameters(var).values()), lr=1.0),
        privacy=privacy,
        resources=ResourcesConfig(rows_per_forward=rows),
        dataset_size=8,
        planned_steps=2,
        noise_multiplier=0.0,
        debug_seed=0,
    )
    inputs.draws.key = state.example_key
    try:
        private_step(state, torch.tensor(list(examples)), inputs.view_losses)
        split = state.views_per_chunk
    finally:
        release(state)
    return {n: before[n] - p.detach() for n, p in trainable_parameters(var).items()}, var, split


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("max_grad_norm", (1e-3, 1e3))  # every example clipped; none
def test_an_example_s_views_spread_over_forwards_give_the_one_forward_clipped_step(method, max_grad_norm):
    """k = 4 views in forwards of 1, 2 and 3 (3 + 1) views: each example's gradient accumulated over its forwards
    and clipped once equals book-keeping's clipped sum from one forward of its 4 views, with the same per-example
    draws (views, class dropout, drop-path: a view's drop-path rows taken from the wrong view move the sum by
    ~1e-2 relative)."""
    expected, var, split = split_views_step(method, rows=4, k=4, max_grad_norm=max_grad_norm)
    assert split is None
    assert sum(float(update.abs().max()) > 0 for update in expected.values()) > len(expected) / 2
    weights = trainable_parameters(var)
    for rows in (1, 2, 3):
        got, _, split = split_views_step(method, rows=rows, k=4, max_grad_norm=max_grad_norm)
        assert split == rows
        for name, update in expected.items():
            # Two ulps of the weight the update is read off, or 1e-5 of the tensor's largest update (a zero-started
            # LoRA B's entries are the updates themselves: summed in another order, a near-zero one differs by
            # ~1e-14 at ~1e-7 relative to the largest).
            ulps = 2 * torch.finfo(torch.float32).eps * float(weights[name].detach().abs().max())
            atol = max(ulps, 1e-5 * float(update.abs().max()))
            torch.testing.assert_close(
                got[name], update, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_split_views_clip_each_example_to_c():
    """One example, its gradient far above C: the split route's update has norm C (to rounding), as the
    one-forward route's has; and k views in forwards of 2 clip the example's view-mean gradient, not each
    forward's part (that would sum two clipped parts to up to 2C)."""
    for rows in (2, 4):
        updates, _, _ = split_views_step("lora", rows=rows, k=4, max_grad_norm=1e-3, examples=[5])
        update = torch.cat([u.flatten() for u in updates.values()])
        # x the expected batch (4); c = C / (norm + 1e-6), as book-keeping's: at this norm (~2e-3) ~5e-4 below C.
        assert 0.999 * 1e-3 < float(update.norm()) * 4 <= 1e-3 * (1 + 1e-6), rows


def test_views_spread_over_forwards_need_book_keeping_clipping_which_auto_may_not_be():
    """A model with a layer book-keeping has no rule for: "auto" is hooks, and the error says so and advises only
    what works (asking for book-keeping would be refused for that layer)."""
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
    privacy = PrivacyConfig(
        target_epsilon=10.0, sampling_rate=0.5, max_grad_norm=1.0, augmentation_multiplicity=4
    )
    with pytest.raises(
        PrivacyConfigError,
        match=r"not 'auto', which is 'hooks' for this model \(book-keeping has no rule for one of its trainable "
        r"layers, or two layers share a parameter\): "
        r"use rows_per_forward >= k$",
    ):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=1.0),
            privacy=privacy,
            resources=ResourcesConfig(rows_per_forward=2),
            dataset_size=8,
            planned_steps=2,
        )


def test_views_spread_over_forwards_need_book_keeping_clipping():
    data, vqvae, var = split_views_setup("lora", views=6)
    privacy = PrivacyConfig(
        target_epsilon=10.0,
        sampling_rate=0.5,
        max_grad_norm=1.0,
        augmentation_multiplicity=4,
        clipping="hooks",
    )
    with pytest.raises(
        PrivacyConfigError,
        match=r"resources.rows_per_forward: 3 rows hold fewer than one example's k=4 views; spreading an example's "
        r"views over forwards needs book-keeping clipping, not 'hooks'",
    ):
        make_private(
            var,
            torch.optim.SGD(list(trainable_parameters(var).values()), lr=1.0),
            privacy=privacy,
            resources=ResourcesConfig(rows_per_forward=3),
            dataset_size=8,
            planned_steps=2,
        )


def test_a_dp_finetune_spreads_an_example_s_views_over_forwards():
    """The training loop's own step inputs take a slice of an example's views: k = 4 views in forwards of 3 train
    (four finite steps) and the cost record says 3 rows per forward."""
    data, vqvae, var = split_views_setup("lora", views=6)
    out = finetune(
        var,
        vqvae,
        data,
        optimization=OptimizationConfig(steps=4, batch_size=4, learning_rate=1e-2),
        method=MethodConfig(name="lora", lora_rank=4),
        plan=RunPlan(planned_steps=4, log_every=1),
        privacy=PrivacyConfig(
            target_epsilon=8.0, sampling_rate=0.5, max_grad_norm=1.0, augmentation_multiplicity=4
        ),
        debug_seed=0,
        resources=ResourcesConfig(rows_per_forward=3),
    )
    assert [entry["step"] for entry in out["history"]] == [1, 2, 3, 4]
    assert out["compute"]["rows_per_forward"] == 3
    assert all(torch.isfinite(p).all() for p in trainable_parameters(var).values())


def short_run(resources: ResourcesConfig, *, prior: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Four non-DP LoRA steps of 8 examples (with a prior term), logging every step: (output, trained weights)."""
    data, vqvae, var = token_setup(views=1)
    teacher = build_var(**TINY_VAR, drop_path_rate=0.0, generator=torch.Generator().manual_seed(0)).eval()
    bank = build_prior_bank(
        teacher, vqvae, num_samples=8, evaluation=GREEDY, generator=torch.Generator().manual_seed(0)
    )
    out = finetune(
        var,
        vqvae,
        data,
        optimization=OptimizationConfig(steps=4, batch_size=8, learning_rate=1e-2),
        method=MethodConfig(name="lora", lora_rank=4, prior_weight=0.1 if prior else 0.0),
        plan=RunPlan(planned_steps=4, log_every=1, prior_batch_size=4),
        prior=Prior(teacher, bank) if prior else None,
        resources=resources,
    )
    return out, {n: p.detach().clone() for n, p in trainable_parameters(var).items()}


def test_a_finetune_with_accumulation_reproduces_the_one_shot_run():
    one_shot, weights = short_run(ResourcesConfig(rows_per_forward=0))
    accumulated, accumulated_weights = short_run(ResourcesConfig(rows_per_forward=3))
    for a, b in zip(accumulated["history"], one_shot["history"], strict=True):
        for key in ("loss", "grad_norm", "prior_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert_same_gradients(accumulated_weights, weights, tol=dict(rtol=1e-4, atol=1e-5))
    assert accumulated["compute"]["rows_per_forward"] == 3 and one_shot["compute"]["rows_per_forward"] == 0
    assert one_shot["compute"]["attention_kernel"] == "per_scale"  # "auto"
    assert accumulated["compute"]["rows_trained"] == one_shot["compute"]["rows_trained"] == 4 * 8


# --- compiled blocks --------------------------------------------------------------------------------------
def test_compiled_blocks_give_the_eager_logits_and_gradients(vqvae):
    """LoRA through peft: the blocks are found inside the wrapped model, compiled in place (names unchanged)."""
    label_B, idx_Bl = batch()
    x_BLCv = vqvae.idxBl_to_var_input(idx_Bl)
    eager, compiled = adapted("lora", kernel="per_scale"), adapted("lora", kernel="per_scale")
    names = [n for n, _ in compiled.named_parameters()]
    assert compile_blocks(compiled) == TINY_VAR["depth"]
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert [n for n, _ in compiled.named_parameters()] == names
    with torch.no_grad():
        torch.testing.assert_close(compiled(label_B, x_BLCv), eager(label_B, x_BLCv), **LOGITS_TOL)
    assert_same_gradients(
        step_gradients(compiled, vqvae, label_B, idx_Bl), step_gradients(eager, vqvae, label_B, idx_Bl)
    )
    assert uncompile_blocks(compiled) == TINY_VAR["depth"] and uncompile_blocks(compiled) == 0


def test_every_block_of_a_deep_model_with_drop_path_shares_one_compiled_graph(vqvae):
    """Drop-path's p grows with depth. Compiled blocks that read p as a float attribute compiled anew per block:
    with torch's global generator (``bernoulli_(1 - p)``, the GPU benchmark's path) until dynamo's recompile limit
    (8) left the rest eager, so VAR-d16's blocks 8-15 ran uncompiled in rows recorded as compiled; with keyed
    uniforms (trials) into three graphs. p now enters as a tensor: block 0 (no drop-path) and all the others make
    two graphs at any depth on either path, and the step equals the eager one under the same draws."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    depth = torch._dynamo.config.recompile_limit + 2
    eager = build_var(
        **{**TINY_VAR, "depth": depth},
        drop_path_rate=0.5,
        attention_kernel="per_scale",
        generator=torch.Generator().manual_seed(0),
    ).train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(compiled) == depth
    label_B, idx_Bl = batch()
    x_BLCv = vqvae.idxBl_to_var_input(idx_Bl).detach()
    u_BD = torch.rand(len(label_B), 2 * depth, generator=torch.Generator().manual_seed(0))
    assert 0 < (u_BD[:, 2:] < 0.5).float().mean() < 1  # some branches dropped, some kept
    for uniforms in (u_BD, None):  # keyed draws, then torch's global generator (seeded alike for both)
        logits = {}
        for name, var in (("eager", eager), ("compiled", compiled)):
            var.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            logits[name] = var(label_B, x_BLCv, drop_path_uniform_BD=uniforms)
            logits[name].square().mean().backward()
        torch.testing.assert_close(logits["compiled"], logits["eager"], **LOGITS_TOL)
        assert_same_gradients(gradients(compiled), gradients(eager))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_drop_path_keeps_a_bf16_models_residual_stream_bf16(vqvae):
    """The drop-path factor is float32 (1/(1-p) rounded to bf16 would bias the kept branch); the scaled branch is
    rounded back to the branch's dtype, so a model held in bf16 trains: a float32 branch once made the residual
    float32 and the next block's bf16 qkv product failed."""
    var = build_var(
        **{**TINY_VAR, "depth": 3}, drop_path_rate=0.5, generator=torch.Generator().manual_seed(0)
    )
    var = var.to(torch.bfloat16).train()
    label_B, idx_Bl = batch()
    x_BLCv = vqvae.idxBl_to_var_input(idx_Bl).detach().to(torch.bfloat16)
    u_BD = torch.rand(len(label_B), 2 * var.depth, generator=torch.Generator().manual_seed(0))
    logits_BLV = var(label_B, x_BLCv, drop_path_uniform_BD=u_BD)
    logits_BLV.float().square().mean().backward()
    assert torch.isfinite(logits_BLV.float()).all()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in var.blocks.parameters())


def test_a_blocks_residual_adds_branch_times_gamma_times_the_drop_path_factor_in_one_pass():
    """x + h * gamma * factor with the rows' factors folded into gamma [B, 1, C]: the published order (the branch
    times gamma, then the row's factor, then the sum) up to float32 rounding, gradients too; a dropped row's
    residual passes through bit for bit; bf16 branch and gamma (autocast's) are multiplied in float32, not rounded
    to bf16 before the float32 residual."""
    block = AdaLNSelfAttn(32, 4, mlp_ratio=4.0, drop_path=0.5, attn_l2_norm=True, shared_aln=False)
    g = torch.Generator().manual_seed(0)
    x_BLC, h_BLC = (torch.randn(3, 14, 32, generator=g, requires_grad=True) for _ in range(2))
    gamma_B1C = torch.randn(3, 1, 32, generator=g, requires_grad=True)
    scale_B = torch.tensor([2.0, 0.0, 2.0])
    upstream_BLC = torch.randn(3, 14, 32, generator=g)
    results = []
    for add in (
        lambda: block._add_branch(x_BLC, h_BLC, gamma_B1C, scale_B),
        lambda: x_BLC + (h_BLC * gamma_B1C) * scale_B.view(-1, 1, 1),
    ):
        out_BLC = add()
        grads = torch.autograd.grad(out_BLC, (x_BLC, h_BLC, gamma_B1C), upstream_BLC)
        results.append((out_BLC, *grads))
    for ours, published in zip(*results, strict=True):
        torch.testing.assert_close(ours, published, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[0][0][1], x_BLC[1])  # the dropped row
    h_bf16, gamma_bf16 = h_BLC.detach().bfloat16(), gamma_B1C.detach().bfloat16()
    ours = block._add_branch(x_BLC.detach(), h_bf16, gamma_bf16, None)
    exact = x_BLC.detach() + h_bf16.float() * gamma_bf16.float()
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=1e-6)
    rounded_first = x_BLC.detach() + (h_bf16 * gamma_bf16).float()
    assert (rounded_first - exact).abs().max() > 1e-3  # the test tells the two apart


@pytest.mark.parametrize(
    "h_dtype, gamma_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
)
def test_a_blocks_residual_backward_is_autograd_s_through_addcmul_bit_for_bit(h_dtype, gamma_dtype):
    """The residual's own backward (``_AddBranch``) against autograd's through ``torch.addcmul``: the branch's
    gradient written in its dtype (bf16 under autocast; gamma bf16 from ada_lin, float32 with a drop-path factor)
    and gamma's sum over L are the same bits, and so is the output."""
    block = AdaLNSelfAttn(32, 4, mlp_ratio=4.0, drop_path=0.0, attn_l2_norm=True, shared_aln=False)
    g = torch.Generator().manual_seed(0)
    x_BLC = torch.randn(3, 680, 32, generator=g)
    h_BLC = torch.randn(3, 680, 32, generator=g).to(h_dtype)
    gamma_B1C = torch.randn(3, 1, 32, generator=g).to(gamma_dtype)
    upstream_BLC = torch.randn(3, 680, 32, generator=g)
    results = []
    for add in (lambda *t: block._add_branch(*t, None), torch.addcmul):
        leaves = [t.clone().requires_grad_() for t in (x_BLC, h_BLC, gamma_B1C)]
        out_BLC = add(*leaves)
        results.append((out_BLC, *torch.autograd.grad(out_BLC, leaves, upstream_BLC)))
    assert results[0][0].grad_fn.name().startswith("_AddBranch")
    for ours, autograds in zip(*results, strict=True):
        assert ours.dtype == autograds.dtype and torch.equal(ours, autograds)


def modulation_inputs(*, mul_dtype: torch.dtype, seed: int = 0):
    """x [3, 680, 64] (float32), mul and shift [3, 1, 64] in ``mul_dtype`` (bf16 as a block's ada_lin gives them
    under autocast, float32 as the shared variant's sum does), and a bf16 upstream gradient (a linear layer's input
    gradient under autocast)."""
    g = torch.Generator().manual_seed(seed)
    x_BLC = torch.randn(3, 680, 64, generator=g, requires_grad=True)
    mul_B1C, shift_B1C = (
        (torch.randn(3, 1, 64, generator=g) + 1).to(mul_dtype).requires_grad_() for _ in range(2)
    )
    return x_BLC, mul_B1C, shift_B1C, torch.randn(3, 680, 64, generator=g).to(torch.bfloat16)


def modulation_run(fn, *, mul_dtype: torch.dtype, autocast: bool = True):
    """(output, gradients of x, mul and shift) of ``fn(layer_norm(x), mul, shift)`` (``modulation_inputs``)."""
    x_BLC, mul_B1C, shift_B1C, upstream_BLC = modulation_inputs(mul_dtype=mul_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out_BLC = fn(F.layer_norm(x_BLC, (64,), eps=1e-6), mul_B1C, shift_B1C)
    grads = torch.autograd.grad(out_BLC, (x_BLC, mul_B1C, shift_B1C), upstream_BLC.to(out_BLC.dtype))
    return out_BLC, *grads


def published_modulation(ln_BLC, mul_B1C, shift_B1C):
    """The published ``ln * mul + shift`` (float32), then the cast the linear layer after it makes under autocast."""
    return (ln_BLC * mul_B1C + shift_B1C).to(torch.get_autocast_dtype("cpu"))


@pytest.mark.parametrize("mul_dtype", (torch.bfloat16, torch.float32))
def test_adaln_modulation_comes_in_the_autocast_dtype_with_autograd_s_gradients(mul_dtype):
    """Under autocast the modulated stream comes in bf16 (what the next product casts it to), rounded once where
    the published form rounds in float32 and then casts. A few entries differ (about 2 in 10^5 over 20 seeds): by
    one bf16 step, or by a few steps of a small result where ln * mul nearly cancels shift; ours is never the
    farther from the exact value. For the same upstream gradient the gradients are autograd's through the
    published expression and its cast: x's (through ln's) bit for bit, the modulation's sums over L to summation
    order. A bf16 product for ln's gradient (both operands bf16) would round it and fail."""
    ours = modulation_run(modulate, mul_dtype=mul_dtype)
    published = modulation_run(published_modulation, mul_dtype=mul_dtype)
    assert ours[0].dtype == published[0].dtype == torch.bfloat16
    differ = ours[0] != published[0]
    assert differ.float().mean() < 1e-3
    # A bf16 step is at most 2^-7 of the value; where ln * mul nearly cancels shift, the float32 roundings of the
    # operands' size (2^-24 each) decide instead.
    x_BLC, mul_B1C, shift_B1C, _ = modulation_inputs(mul_dtype=mul_dtype)
    ln_BLC = F.layer_norm(x_BLC.detach(), (64,), eps=1e-6)
    operands = (ln_BLC * mul_B1C.detach().float()).abs() + shift_B1C.detach().float().abs()
    bound = published[0].float().abs() * 2**-7 + operands * 2**-22
    assert ((ours[0] - published[0]).float().abs() <= bound).all()
    # One rounding, not two: never farther from the exact value than the published form's.
    exact = (ln_BLC.double() * mul_B1C.detach().double() + shift_B1C.detach().double()).float()
    assert ((ours[0].float() - exact).abs() <= (published[0].float() - exact).abs()).all()
    assert torch.equal(ours[1], published[1])
    for got, expected in zip(ours[2:], published[2:], strict=True):
        assert got.dtype == expected.dtype == mul_dtype
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # Sampling's path: no autograd function, the same single pass.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        again = modulate(ln_BLC, mul_B1C, shift_B1C)
    assert torch.equal(again, ours[0])


def test_adaln_modulation_outside_autocast_is_the_published_float32_expression():
    """No autocast (float32 training, the CPU path, parity with the official code): the same bits, in float32."""
    ours = modulation_run(modulate, mul_dtype=torch.float32, autocast=False)
    published = modulation_run(lambda *a: a[0] * a[1] + a[2], mul_dtype=torch.float32, autocast=False)
    assert ours[0].dtype == torch.float32
    for got, expected in zip(ours, published, strict=True):
        assert torch.equal(got, expected)


def test_a_tiny_var_trains_under_autocast_with_the_modulation_as_with_the_published_expression(
    vqvae, monkeypatch
):
    """A whole LoRA model under CPU bf16 autocast (its mat_qkv and fc1 adapters now get a bf16 input, whose two
    branch gradients are summed in bf16): loss and gradients as with the published modulation to bf16 rounding."""
    import trainables.models.var as var_module

    label_B, idx_Bl = batch()
    x_BLCv = vqvae.idxBl_to_var_input(idx_Bl).detach()
    results = []
    for fn in (modulate, lambda ln, mul, shift: ln * mul + shift):
        monkeypatch.setattr(var_module, "modulate", fn)
        var = adapted("lora")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_BLV = var(label_B, x_BLCv, drop_path_uniform_BD=None)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), torch.cat(idx_Bl, dim=1).flatten())
        loss.backward()
        results.append((loss.detach(), gradients(var)))
    (loss, grads), (published_loss, published_grads) = results
    torch.testing.assert_close(loss, published_loss, rtol=1e-3, atol=0)
    for name, expected in published_grads.items():
        scale = expected.abs().max()
        assert (grads[name] - expected).abs().max() <= 2**-6 * scale, name


@pytest.mark.parametrize("method", ("full", "lora"))
@pytest.mark.parametrize("autocast", (False, True))
@pytest.mark.parametrize("hooked_type", ("QKVBias", "HeadScale"))
def test_unhooked_patch_modules_are_folded_with_the_numbers_of_their_calls(
    vqvae, autocast, method, hooked_type, monkeypatch
):
    """Without DP nothing hooks the patch modules holding the q/v biases and the queries' scale, so the biases go into
    the qkv product and the gain into the normalisation, neither module called (LoRA's mat_qkv takes the frozen biases
    into its product under autocast, ``linear_plus_bias``; outside it the bias module is called). Hooked (as per-sample
    gradients hook them), each module is called. A hooked HeadScale gives the gain per row, which the normalisation
    multiplies in as it does unhooked: the same loss, bit for bit, and the same gradients to float32 rounding (the rows'
    gain gradients are summed over rows after their own sums). A hooked QKVBias adds the biases after the product:
    float32 to its rounding; under CPU bf16 autocast, to bf16 roundings (the bias added after the product's rounding
    instead of before it), and the scale's gradient to 2^-3 of its largest entry: a sum over every query entry that
    nearly cancels, which one bf16 step in q moves by percents."""
    from trainables import patches

    label_B, idx_Bl = batch()
    x_BLCv = vqvae.idxBl_to_var_input(idx_Bl).detach()
    hooked_cls = getattr(patches, hooked_type)
    results = {}
    for hooked in (True, False):
        calls = []
        var = adapted(method)
        with torch.no_grad():  # the biases and scales off their zero and published starts
            for name, p in var.named_parameters():
                if name.endswith(("q_bias", "v_bias", "scale_mul_1H11")):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        for module in var.modules():
            if isinstance(module, hooked_cls) and hooked:
                module.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        for cls in (patches.QKVBias, patches.HeadScale):
            monkeypatch.setattr(
                cls,
                "__call__",
                lambda self, *a, c=cls.__call__, calls=calls, **kw: calls.append(0) or c(self, *a, **kw),
            )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits_BLV = var(label_B, x_BLCv, drop_path_uniform_BD=None)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), torch.cat(idx_Bl, dim=1).flatten())
        loss.backward()
        monkeypatch.undo()
        results[hooked] = (loss.detach(), gradients(var), calls)
    blocks = TINY_VAR["depth"]
    bias_calls = [0] * blocks if method == "lora" and not autocast else []
    assert results[True][2].count(1) == blocks and results[False][2] == bias_calls
    (loss, grads, _), (called_loss, called_grads, _) = results[False], results[True]
    bf16_rounded = autocast and hooked_type == "QKVBias"
    if hooked_type == "HeadScale":
        assert torch.equal(loss, called_loss)
    torch.testing.assert_close(loss, called_loss, rtol=1e-2 if bf16_rounded else 1e-6, atol=0)
    for name, expected in called_grads.items():
        scale = expected.abs().max()
        tol = (2**-3 if name.endswith("scale_mul_1H11") else 2**-5) if bf16_rounded else 1e-5
        assert (grads[name] - expected).abs().max() <= tol * scale, name


def test_compiled_blocks_give_the_eager_clipped_dp_step_with_bookkeeping(vqvae):
    """Book-keeping's hooks on the linears inside compiled blocks still see every input and output gradient."""
    expected = dp_step_gradients(adapted("lora", kernel="per_scale"), vqvae)
    var = adapted("lora", kernel="per_scale")
    compile_blocks(var)
    assert_same_readouts(dp_step_gradients(var, vqvae), expected, var)


@pytest.mark.parametrize("field", ("compile", "compile_sampling"))
def test_compile_is_refused_with_opacus_hooks_and_ghost_clipping(field):
    compiled = ResourcesConfig(**{field: True})
    for clipping in ("hooks", "ghost"):
        with pytest.raises(ConfigError, match=f"resources.{field}: .*clipping='{clipping}'"):
            trial(privacy=dataclasses.replace(DP, clipping=clipping), resources=compiled)
    trial(privacy=dataclasses.replace(DP, clipping="bookkeeping"), resources=compiled)
    trial(privacy=DP, resources=compiled)  # auto: book-keeping for an adapted VAR
    trial(resources=compiled)


# --- fused AdamW ------------------------------------------------------------------------------------------
def test_fused_adamw_steps_like_the_default_and_their_states_load_into_each_other():
    """torch 2.15 runs fused AdamW on CPU: three steps on the same gradients agree to float rounding (measured
    ~1e-8 here; the updates are ~1e-2), and a state saved by either resumes in the other, which keeps its own
    implementation and continues as the saving one would."""
    models = {fused: adapted("full") for fused in (True, False)}
    optimizers = {fused: build_optimizer(m, lr=1e-2, fused=fused) for fused, m in models.items()}
    assert optimizers[True].param_groups[0]["fused"] and not optimizers[False].param_groups[0]["fused"]
    assert not build_optimizer(models[True], lr=1e-2).param_groups[0]["fused"]  # None on CPU: the default
    g = torch.Generator().manual_seed(3)
    grads = [
        {
            n: torch.randn(p.shape, generator=g) * 10.0**-s
            for n, p in trainable_parameters(models[True]).items()
        }
        for s in range(4)
    ]

    def step(var, optimizer, grads) -> None:
        for name, p in trainable_parameters(var).items():
            p.grad = grads[name].clone()
        optimizer.step()

    for i in range(3):
        for fused, var in models.items():
            step(var, optimizers[fused], grads[i])
    tol = dict(rtol=1e-5, atol=1e-7)
    assert_same_gradients(
        dict(trainable_parameters(models[True])), dict(trainable_parameters(models[False])), tol
    )

    for saved in (
        True,
        False,
    ):  # resume each from the other's state: one more step, as the saver would take it
        resumed, reference = copy.deepcopy(models[saved]), copy.deepcopy(models[saved])
        optimizer = build_optimizer(resumed, lr=1e-2, fused=not saved)
        saved_state = copy.deepcopy(optimizers[saved].state_dict())  # as from a file: no tensor shared
        load_optimizer_state(optimizer, saved_state)
        assert bool(optimizer.param_groups[0]["fused"]) is (not saved)
        reference_optimizer = build_optimizer(reference, lr=1e-2, fused=saved)
        reference_optimizer.load_state_dict(copy.deepcopy(saved_state))
        step(resumed, optimizer, grads[3])
        step(reference, reference_optimizer, grads[3])
        assert_same_gradients(dict(trainable_parameters(resumed)), dict(trainable_parameters(reference)), tol)


# --- schema -----------------------------------------------------------------------------------------------
def test_attention_kernel_names_are_the_models_and_auto_is_per_scale():
    assert ATTENTION_KERNEL_CHOICES == ("auto", *ATTENTION_KERNELS)
    assert ResourcesConfig().training_attention_kernel == "per_scale"
    assert ResourcesConfig(attention_kernel="masked").training_attention_kernel == "masked"
    with pytest.raises(ConfigError, match="resources.attention_kernel.*'sdpa'"):
        ResourcesConfig(attention_kernel="sdpa")
    with pytest.raises(ConfigError, match="resources.compile"):
        ResourcesConfig(compile=1)


@pytest.mark.parametrize("dp", (False, True))
def test_how_the_training_computes_leaves_the_trial_id_alone(dp):
    config = smoke_version(build_sweep("table2" if dp else "table1")[0])
    assert (config.privacy is not None) == dp
    for fields in (
        {"attention_kernel": "masked"},
        {"compile": True},
        {"compile_sampling": True},
        {"rows_per_forward": 0 if dp else 64},
    ):
        changed = replace(config, resources=fields)
        assert changed.trial_id == config.trial_id
        assert TrialConfig.from_dict(changed.to_dict()) == changed
