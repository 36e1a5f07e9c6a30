"""scripts/benchmark_dp_memory.py counts tensor memory itself: its counter must see creations and releases exactly,
views and in-place results as nothing new, and name the phase where the peak fell; its traffic counter must count
each operand read once and each result written once, views and allocations as nothing, a product's FLOPs, and put
an operation on the roofline at the slower of its two times (a broadcast operand read once, an ``out=`` tensor
written only); and CUDA autocast's float32 norms can be replayed under CPU autocast."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from conftest import REPO, lora_twins

sys.path.insert(0, str(REPO / "scripts"))

import torch.nn.functional as F
from benchmark_dp_memory import (
    FLOAT32_ON_CUDA,
    H200_DATASHEET,
    CudaAutocast,
    LiveTensorBytes,
    Traffic,
    _phased,
    configurations,
    cuda_products_library,
    table,
)

from trainables import bookkeeping
from trainables.models import KVCache, build_vqvae, vqvae
from trainables.models.var import AdaLNSelfAttn, modulate, unit_vectors

MIB = 1024**2


def test_counts_what_is_created_and_released_and_nothing_twice():
    before = torch.zeros(MIB // 4)  # made before the mode: updating it in place or viewing it creates nothing
    with LiveTensorBytes() as tracker:
        before.add_(1.0)
        before[:8].mul_(2.0)
        assert tracker.live == 0
        a = torch.ones(MIB // 4)  # 1 MiB of float32
        b = torch.ones(MIB // 2)  # 2 MiB
        view = b[: MIB // 4]
        view.add_(1.0)  # in place, on b's storage
        b.view(2, -1).mul_(2.0)
        assert tracker.live == 3 * MIB
        del b
        assert tracker.live == 3 * MIB  # the view keeps b's storage alive
        del view
        assert tracker.live == MIB
        c = a.to(torch.bfloat16)  # 0.5 MiB
        assert tracker.live == MIB + MIB // 2 and tracker.peak == 3 * MIB
        del a, c
    assert tracker.live == 0


def test_the_peak_is_placed_in_its_phase():
    """A model whose backward creates more than its forward (a gradient for its 4 MiB weight) and an update that
    creates more still (SGD's momentum buffer, 4 MiB, beside the gradient)."""
    model = torch.nn.Linear(1024, 1024, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = LiveTensorBytes()
    backward = torch.autograd.backward
    restore = _phased(model, optimizer, tracker)
    try:
        with tracker:
            model(torch.ones(2, 1024)).sum().backward()
            after_backward = tracker.peak, tracker.peak_phase
            optimizer.step()
    finally:
        restore()
    assert torch.autograd.backward is backward and optimizer.step.__func__ is torch.optim.SGD.step
    assert after_backward[1] == "backward" and after_backward[0] >= 4 * MIB
    assert tracker.peak_phase == "update" and tracker.peak >= 8 * MIB


def test_traffic_counts_reads_writes_flops_and_the_roofline():
    x = torch.ones(256, 1024)  # 1 MiB of float32
    w = torch.ones(1024, 1024, dtype=torch.bfloat16)  # 2 MiB
    with Traffic() as traffic:
        x.view(1024, 256).t()  # views: nothing moves
        torch.empty(1024, 1024)  # an allocation: nothing moves
        y = x * 2.0  # reads 1 MiB, writes 1 MiB
        y.add_(x)  # reads y and x, writes y: 3 MiB
        y.normal_()  # overwritten, not read: 1 MiB
        assert (traffic.kernels, traffic.bytes, traffic.flops) == (3, 6 * MIB, 0)
        element_wise_s = traffic.roofline_s
        z = x.bfloat16() @ w  # the cast (1 + 0.5 MiB), then a bf16 product: reads 0.5 + 2, writes 0.5 MiB
    assert traffic.kernels == 5 and traffic.bytes == 6 * MIB + 3 * MIB // 2 + 3 * MIB
    product_flops = 2 * 256 * 1024 * 1024
    assert traffic.flops == product_flops and z.dtype == torch.bfloat16
    assert element_wise_s == pytest.approx(6 * MIB / H200_DATASHEET["bytes"], rel=1e-12)
    product_s = max(product_flops / H200_DATASHEET["half_flops"], 3 * MIB / H200_DATASHEET["bytes"])
    cast_s = (3 * MIB // 2) / H200_DATASHEET["bytes"]
    assert traffic.roofline_s == pytest.approx(element_wise_s + cast_s + product_s, rel=1e-12)


def test_traffic_reads_a_broadcast_operand_once_and_reads_no_out_tensor_or_shape_source():
    x = torch.ones(256, 1024)  # 1 MiB
    norm = torch.ones(256, 1)
    out = torch.empty(256, 1024, dtype=torch.bfloat16)
    with Traffic() as traffic:
        x / norm.expand_as(x)  # reads 1 MiB + 1 KiB (the expanded norm's 256 values), writes 1 MiB
        torch.div(x, norm, out=out)  # reads 1 MiB + 1 KiB, writes 0.5 MiB into out (not read)
        torch.zeros_like(x)  # x gives only its shape: writes 1 MiB
        x.new_zeros(())  # writes 4 bytes
    assert traffic.bytes == 2 * MIB + 1024 + MIB + 1024 + MIB // 2 + MIB + 4


def test_an_addmm_into_a_new_tensor_is_counted_as_cuda_runs_it_a_copy_of_the_addend_and_the_product():
    """CUDA's addmm and baddbmm copy an addend (``self``) that is not their output into it, then accumulate the
    product there: 2 kernels, the output written twice and read once. Not so in place, with beta 0, or for
    addmm's bias vector (cuBLASLt's epilogue). An in-place product's FLOPs are counted as the others'."""
    m1, m2 = torch.ones(256, 64), torch.ones(64, 1024)
    addend, out_bytes = torch.ones(256, 1024), 256 * 1024 * 4
    operands = (256 * 64 + 64 * 1024) * 4

    def counted(call) -> Traffic:
        with Traffic() as traffic:
            call()
        return traffic

    one_pass = operands + 2 * out_bytes  # the operands and the addend read, the output written
    copied = counted(lambda: torch.addmm(addend, m1, m2))
    assert (copied.kernels, copied.bytes) == (2, one_pass + 2 * out_bytes)
    assert copied.by_op["copy_ (addend of addmm.default)"][:2] == [1, pytest.approx(2 * out_bytes / 1e9)]
    into = torch.empty(256, 1024)
    assert counted(lambda: torch.addmm(addend, m1, m2, out=into)).bytes == one_pass + 2 * out_bytes
    in_place = counted(lambda: addend.clone().addmm_(m1, m2))  # the clone: 2 x out_bytes, 1 kernel
    assert (in_place.kernels, in_place.bytes) == (2, one_pass + 2 * out_bytes)
    assert in_place.flops == copied.flops == 2 * 256 * 64 * 1024  # in place too (PyTorch's counter skips it)
    assert counted(lambda: torch.addmm(addend, m1, m2, beta=0)).kernels == 1
    vector = torch.ones(1024)
    bias = counted(lambda: torch.addmm(vector, m1, m2))
    assert (bias.kernels, bias.bytes) == (1, operands + 1024 * 4 + out_bytes)
    batched = counted(lambda: torch.baddbmm(addend[None], m1[None], m2[None]))
    assert (batched.kernels, batched.bytes) == (2, one_pass + 2 * out_bytes)


def test_fused_adamw_reads_four_and_writes_three_float32_tensors_per_parameter():
    """The fused kernel returns nothing: its parameters and moments are written in place (the schema's ``a!``),
    its gradients only read (they are written only to unscale them by a grad_scale). 28 bytes per parameter,
    against the several passes of the default implementation."""
    params = [torch.nn.Parameter(torch.ones(256, 1024)), torch.nn.Parameter(torch.ones(1024))]
    count = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    moved = {}
    for fused in (True, False):
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=False if not fused else None)
        optimizer.step()  # the state
        with Traffic() as traffic:
            optimizer.step()
        moved[fused] = traffic.bytes
        if fused:  # beside the step counters' increment, one kernel reading them (4-byte scalars) too
            assert traffic.by_op["_fused_adamw_.default"][:2] == [
                1,
                pytest.approx((28 * count + 4 * 2) / 1e9),
            ]
    assert moved[False] > 2 * moved[True]


@pytest.fixture
def cuda_products(monkeypatch):
    """CUDA's float32-output products replayed on the CPU, and book-keeping's use of them, for one test."""
    library = cuda_products_library()
    monkeypatch.setitem(bookkeeping.NATIVE_FLOAT32_OUTPUT, "cpu", True)
    monkeypatch.setattr(bookkeeping, "_PROBED", set())
    assert bookkeeping._accumulates_float32(torch.device("cpu"))  # probed here, outside the counts
    yield
    library._destroy()


def test_the_noise_takes_kept_gradients_clipped_sum_in_one_pass(cuda_products):
    """DP-SGD's noised mean on a kept bf16 per-example gradient (B examples, J entries): the noise written once,
    then read and written once by the product that adds the clipped sum (the gradients read once): 12 bytes per
    entry beside the gradients' 2 B, where two float32 parts added one by one moved 36. The value is the upcast
    product's."""
    examples, entries = 8, 256 * 1024
    rows_B = torch.randn(examples, entries).bfloat16()
    term = bookkeeping.WeightedRows(bookkeeping.bfloat16_toward_zero(torch.rand(examples)), rows_B)
    with Traffic() as traffic:
        grad = torch.normal(0.0, 1.0, size=(entries,), generator=torch.Generator().manual_seed(0))
        bookkeeping.add_term(grad, term, alpha=0.25)
    assert bookkeeping.NATIVE_FLOAT32_OUTPUT["cpu"]  # the float32-output product ran, no fallback
    assert traffic.kernels == 2
    assert traffic.bytes == 12 * entries + 2 * examples * entries + 2 * examples
    noise = torch.normal(0.0, 1.0, size=(entries,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(grad, noise + 0.25 * (term.weights_B.float() @ rows_B.float()))


def test_outer_products_go_into_the_noise_in_one_pass():
    """A weight whose per-example gradients were not kept (its rows' weighted outer products): added into the noise
    by one float32 product that reads and writes the noise once (8 bytes per entry), where forming the product
    (4, written over an uninitialised output: nothing read) and adding it (4 + 4 + 4) moved 16."""
    out_features, in_features, rows = 512, 256, 8
    term = bookkeeping.WeightedOuterProducts(
        torch.rand(rows), torch.randn(rows, out_features).bfloat16(), torch.randn(rows, in_features)
    )
    moved, sums = [], []
    for fused in (False, True):
        noise = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        with Traffic() as traffic:
            if fused:
                bookkeeping.add_term(noise, term, alpha=0.5)
            else:
                noise.add_(bookkeeping.formed([term]), alpha=0.5)
        moved.append(traffic.bytes)
        sums.append(noise)
    assert moved[0] - moved[1] == 8 * out_features * in_features
    torch.testing.assert_close(sums[1], sums[0])


def test_cuda_autocast_norms_make_f_normalize_float32_as_cuda_autocast_does():
    x = torch.randn(2, 3, 5, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.normalize(x, dim=-1).dtype == torch.bfloat16  # CPU autocast: the norm stays bf16
        with CudaAutocast():
            ours, theirs = F.normalize(x, dim=-1), x.float() / x.float().norm(dim=-1, keepdim=True)
            assert x.norm(dim=-1).dtype == torch.float32
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with CudaAutocast():  # no autocast: nothing changes
        assert F.normalize(x, dim=-1).dtype == torch.bfloat16


def test_unit_vectors_move_fewer_bytes_than_f_normalize_as_cuda_autocast_runs_it():
    """The point of the kernel: under autocast (F.normalize's norm in float32, as on CUDA) the forward and backward
    of a bf16 q or k move well under half of autograd's bytes through F.normalize, with fewer kernels."""
    x_BHLc = torch.randn(2, 16, 680, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    upstream_BHLc = torch.randn(2, 16, 680, 64, generator=torch.Generator().manual_seed(1))
    counted = {}
    for name, normalize in (("ours", unit_vectors), ("F.normalize", lambda x: F.normalize(x, dim=-1))):
        x = x_BHLc.clone().requires_grad_()
        with CudaAutocast(), Traffic() as traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = normalize(x)
            y.backward(upstream_BHLc)
        assert y.dtype == torch.float32  # as on CUDA
        counted[name] = traffic
    assert counted["ours"].bytes < 0.5 * counted["F.normalize"].bytes
    assert counted["ours"].kernels < counted["F.normalize"].kernels


def test_unit_vectors_in_the_attention_s_dtype_move_18_fewer_bytes_per_entry_as_cuda_autocast_runs_them():
    """Forward: the quotient written in bf16 (2 bytes, not 4) and no cast of it (4 + 2): 8 (both norms read the
    bf16 x, in float32, with no copy). Backward: no float32 copy of the gradient (2 + 4), and the bf16 gradient
    read twice instead of the copy (2 + 2): 10. Per row, a few float32 scalars fewer or more."""
    x_BHLc = torch.randn(2, 16, 680, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    upstream_BHLc = torch.randn(x_BHLc.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    moved = {}
    for dtype in (None, torch.bfloat16):
        x = x_BHLc.clone().requires_grad_()
        with CudaAutocast(), Traffic() as traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = unit_vectors(x, dtype=dtype).to(torch.bfloat16)  # the attention's cast (none for bf16)
            y.backward(upstream_BHLc)
        moved[dtype] = traffic.bytes
    entries, rows = x_BHLc.numel(), x_BHLc.numel() // 64
    assert abs(moved[None] - moved[torch.bfloat16] - 18 * entries) <= 4 * rows


@pytest.mark.parametrize("gain_trained", [False, True])
def test_a_hooked_head_scale_moves_the_bytes_of_the_folded_gain(gain_trained):
    """DP hooks the queries' scale (``HeadScale``). Its call gives the gain per row, which the normalisation multiplies
    in, and the gradient reaching it is each row's, reduced by the normalisation's backward anyway: the queries take the
    passes of the folded gain (no DP), forward and backward; the hook adds only the gain gradient's reduction from the
    per-position sums [B, H, L, 1] where the gain was frozen (1/c of the queries' size: 0.25 bytes per query entry
    here). Before, the hooked scale's unit queries were written in float32 and multiplied apart, and its per-sample
    gradient read float32 products of the whole queries: about 30 bytes per query entry more. ``gain_trained`` False:
    book-keeping freezes the scale during its backward and taps the gain for its gradient."""
    from trainables.models.var import SelfAttention
    from trainables.patches import HeadScale

    attention = SelfAttention(128, 2, attn_l2_norm=True)
    attention.head_scale = HeadScale(attention._parameters.pop("scale_mul_1H11"))
    attention.head_scale.scale_mul_1H11.requires_grad_(gain_trained)
    g = torch.Generator().manual_seed(0)
    q_BHLc = torch.randn(2, 2, 680, 64, generator=g).to(torch.bfloat16)
    upstream_BHLc = torch.randn(q_BHLc.shape, generator=g).to(torch.bfloat16)

    anchor = torch.empty(0, requires_grad=True)

    def as_book_keeping(module, args, out):  # book-keeping's tap where the gain needs no gradient, hooked
        out = out if out.requires_grad else bookkeeping._GradientTap.apply(out, anchor)
        out.register_hook(seen.append)
        return out

    moved, seen = {}, []
    for hooked in (False, True):
        handle = attention.head_scale.register_forward_hook(as_book_keeping) if hooked else None
        with CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16), Traffic() as traffic:
            attention.unit_queries(q_BHLc.clone().requires_grad_(), dtype=torch.bfloat16).backward(
                upstream_BHLc
            )
        moved[hooked] = traffic.bytes
        handle and handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 2, 1, 1)
    assert 0 <= moved[True] - moved[False] < q_BHLc.numel()  # under 1 byte per query entry


@pytest.mark.parametrize("features", [(24, 40), (40, 24), (24, 24)])
@pytest.mark.parametrize("dtype, saved_per_input", [(torch.bfloat16, 24), (torch.float32, 14)])
@pytest.mark.parametrize("hooked", [True, False])
def test_lora_layer_moves_fewer_bytes_than_peft_s(dtype, saved_per_input, hooked, features):
    """Bytes per input entry saved under autocast. A bf16 input (fc2's, proj's): peft's layer casts it to float32
    and autocast casts it back, each cast with a backward (2 + 4 and 4 + 2 bytes each way: 24). A float32 input
    (mat_qkv's, fc1's): autocast casts it once for the base layer and once for the adapter (4 + 2), and the
    backward casts both gradients (2 + 4 each) and sums them in float32 (4 + 4 + 4); varsweep's casts once each
    way and adds the bf16 gradient into the other in place (4 + 2 + 4): 14. Per output entry, 8 bytes: peft
    scales the full-width product forward and backward, varsweep the rank-r one; and 4 more: the adapter's
    product accumulated into the base output in place (read and written: 4) instead of that product written (2)
    and both read and the sum written by an add (6), in lora_B's own call where a hook (DP) must see it
    (``AccumulatingLinear``).

    For a bf16 input, 4 more per input entry: its gradient's two products summed the same way (``_LoraProducts``
    unhooked, ``_BaseAndTap`` where lora_B is hooked; into a new tensor, as CUDA copies the addend first, the same
    bytes as the add: this test failed so). Unhooked (``_LoraProducts``), also 8 per rank-r entry, the scaling
    applied in the rank-r products (``alpha``), not by passes of their own; and with more outputs than inputs, no accumulating pass over the output (4 per output entry) but x copied beside
    the adapter's s x A^T (4 per input entry) and B written into the kept weight's spare columns and read (4 per
    entry of B): [x | s x A^T] [W | B]^T; with more inputs, the same on the backward's side: [g | s g B] [W ; A]."""
    stock, ours = lora_twins(32.0, features=features)
    if hooked:
        ours.lora_B["default"].register_forward_hook(lambda *_: None)
    x = torch.randn(3, 7, features[0], generator=torch.Generator().manual_seed(2)).to(dtype)
    tokens, rank, (inputs, outputs) = 3 * 7, 4, features
    counted = {}
    for name, layer in (("stock", stock), ("ours", ours)):
        x_in = x.clone().requires_grad_()
        with Traffic() as traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(
                    x_in.view_as(x_in)
                )  # no leaf, as a block's activation (autocast caches a leaf's cast)
            y.backward(torch.ones_like(y))
        counted[name] = traffic
    saved = saved_per_input * tokens * inputs + 8 * tokens * (outputs - rank)
    saved += 4 * tokens * outputs
    if dtype == torch.bfloat16:  # the input gradient's two products summed in one
        saved += 4 * tokens * inputs
    if not hooked and dtype == torch.bfloat16:  # _LoraProducts
        saved += 8 * tokens * rank
        wider, narrower = max(features), min(features)
        if wider > narrower:
            saved += 4 * tokens * (wider - narrower) - 4 * wider * rank
    assert counted["stock"].bytes - counted["ours"].bytes == saved
    assert counted["ours"].kernels < counted["stock"].kernels


def test_a_frozen_bias_added_inside_the_lora_layer_s_product_saves_its_add():
    """mat_qkv's q/v biases under autocast, unhooked (``linear_plus_bias``): no add over the output after the layer
    (2 + 2 bytes per bf16 output entry, and the bias read); the bias is summed with the base's own [out] bias
    instead (two [out] reads and a write)."""
    _, ours = lora_twins(32.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2)).bfloat16()
    bias = torch.randn(40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x)  # the frozen base's kept cast, made at the first call
    moved = {}
    for folded in (False, True):
        ours.zero_grad(set_to_none=True)  # no accumulation into the last call's
        x_in = x.clone().requires_grad_()
        with Traffic() as traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = ours.linear_plus_bias(x_in, lambda: bias) if folded else ours(x_in) + bias.bfloat16()
            y.backward(torch.ones_like(y))
        moved[folded] = traffic.bytes
    outputs = 3 * 7 * 40
    assert moved[False] - moved[True] == 4 * outputs + 2 * 40 - 3 * 2 * 40


def test_later_steps_do_not_cast_a_frozen_base_weight():
    """Counted under autocast: from the second call on, the base weight [40, 24] and bias [40] are not read in
    float32 and written in bf16 (4 + 2 bytes each), one kernel each fewer."""
    _, ours = lora_twins(32.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    counted = []
    for _ in range(2):
        for p in ours.parameters():
            p.grad = None  # no accumulation into the last step's
        with Traffic() as traffic:
            x_in = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = ours(x_in.view_as(x_in))
            y.backward(torch.ones_like(y))
        counted.append(traffic)
    assert counted[0].bytes - counted[1].bytes == 6 * (40 * 24 + 40)
    assert counted[0].kernels - counted[1].kernels == 2


def test_adaln_modulation_moves_28_fewer_bytes_per_entry_under_autocast():
    """Per entry of the modulated stream [B, L, C], under autocast. The published ``ln * mul + shift`` then the
    next product's cast: forward 8 + 8 + 6 bytes, backward the cast's 2 + 4, shift's sum 4, ln's gradient 4 + 4
    and mul's product and sum 4 + 4 + 4 + 4 (56). ``modulate``: forward 4 + 2, backward ln's gradient 2 + 4, mul's
    2 + 4 + 4 + 4 and shift's sum 2 (28). What differs beyond that is on the [B, 1, C] modulation only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 680, 64, generator=g)
    mul, shift = (torch.randn(2, 1, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    upstream = torch.randn(2, 680, 64, generator=g).to(torch.bfloat16)
    published = lambda ln, m, s: (ln * m + s).to(torch.bfloat16)  # noqa: E731
    counted = {}
    for name, fn in (("published", published), ("ours", modulate)):
        ln = F.layer_norm(x.clone().requires_grad_(), (64,))
        m, s = mul.clone().requires_grad_(), shift.clone().requires_grad_()
        with Traffic() as traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fn(ln, m, s)
            y.backward(upstream)
        counted[name] = traffic
    saved = counted["published"].bytes - counted["ours"].bytes
    assert abs(saved - 28 * x.numel()) <= 16 * mul.numel()
    assert counted["ours"].kernels < counted["published"].kernels


@pytest.mark.parametrize("h_dtype, saved_per_entry", [(torch.bfloat16, 26), (torch.float32, 8)])
def test_a_blocks_residual_moves_fewer_bytes_than_a_plain_addcmul_as_cuda_autocast_runs_it(
    h_dtype, saved_per_entry
):
    """Per entry of the branch h [B, L, C], forward and backward under autocast with CUDA's rules. A plain
    ``addcmul`` (varsweep's residual before): for a bf16 h, CUDA autocast first copies it to float32 (2 + 4) and
    the sum reads that copy (4, not 2); autograd's backward multiplies h by the scalar 1, writes grad * gamma in
    float32 (4 + 4) and casts it to h's dtype (4 + 2): 26 bytes more than ``residual_sum`` with ``_AddBranch``'s
    backward, which writes grad * gamma in h's dtype. For a float32 h, the product with 1 (4 + 4): 8."""
    block = AdaLNSelfAttn(64, 4, mlp_ratio=4.0, drop_path=0.0, attn_l2_norm=True, shared_aln=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 680, 64, generator=g)
    h = torch.randn(2, 680, 64, generator=g).to(h_dtype)
    gamma = torch.randn(2, 1, 64, generator=g).to(torch.bfloat16)
    upstream = torch.randn(2, 680, 64, generator=g)
    counted = {}
    for name, add in (("addcmul", torch.addcmul), ("ours", lambda *t: block._add_branch(*t, None))):
        leaves = [t.clone().requires_grad_() for t in (x, h, gamma)]
        with CudaAutocast(), Traffic() as traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = add(*leaves)
            out.backward(upstream)
        counted[name] = traffic
    saved = counted["addcmul"].bytes - counted["ours"].bytes
    assert (
        saved == saved_per_entry * h.numel() + 18 * gamma.numel()
    )  # and gamma's own copy and product with 1
    assert counted["ours"].kernels < counted["addcmul"].kernels


def test_cuda_autocast_promotes_addcmul_but_not_its_out_form():
    """CUDA autocast copies a bf16 operand of ``addcmul`` beside a float32 one to float32 (its promote list); CPU
    autocast does not, and neither copies for the ``out=`` form: the mode replays the first on a CPU."""
    x, h = torch.randn(2, 30, 8), torch.randn(2, 30, 8).to(torch.bfloat16)
    gamma = torch.randn(2, 1, 8).to(torch.bfloat16)
    copies = {}
    for name, mode in (("cpu", contextlib.nullcontext), ("cuda", CudaAutocast)):
        for form, call in (
            ("plain", lambda: torch.addcmul(x, h, gamma)),
            ("out", lambda: torch.addcmul(x, h, gamma, out=torch.empty_like(x))),
        ):
            with mode(), Traffic() as traffic, torch.autocast("cpu", dtype=torch.bfloat16):
                assert call().dtype == torch.float32
            copies[name, form] = traffic.by_op.get("_to_copy.default", [0])[0]
    assert copies == {("cpu", "plain"): 0, ("cpu", "out"): 0, ("cuda", "plain"): 2, ("cuda", "out"): 0}


def test_table_compares_each_code_s_dp_step_with_its_own_non_dp_step():
    """With ``--versus`` both codes' non-DP steps are measured, and each DP row's ratios are against its own."""

    def row(code: str, dp: bool, traffic_gb: float) -> dict:
        return dict(method="lora", k=1, rows=8, precision="bf16", dp=dp, code=code, route="auto") | dict(
            held_mib=100.0,
            peak_mib=100.0,
            peak_phase="backward",
            flops=1e12,
            traffic_gb=traffic_gb,
            kernel_count=10,
            roofline_ms=traffic_gb,
        )

    rows = [row("c1eeb15", False, 10.0), row("this tree", False, 8.0)]
    rows += [row("c1eeb15", True, 11.0), row("this tree", True, 8.4)]
    lines = table(rows)[2:]
    assert [line.split(" | ")[4] for line in lines] == [
        "no DP c1eeb15",
        "book-keeping c1eeb15, auto routes",
        "no DP this tree",
        "book-keeping this tree, auto routes",
    ]
    assert [line.split(" | ")[10] for line in lines] == ["1.00x", "1.10x", "1.00x", "1.05x"]
    single = table([row("this tree", False, 8.0), row("c1eeb15", True, 11.0), row("this tree", True, 8.4)])
    assert [line.split(" | ")[4] for line in single[2:]][
        0
    ] == "no DP"  # one non-DP code: every DP row beside it
    assert len(single) == 5


def test_configurations_pair_each_dp_step_with_its_non_dp_step():
    """ "auto@R" is the auto routes with a keep ratio R, and every configuration carries the geometry asked for."""
    configs = configurations(
        "1:8",
        "bf16",
        routes="auto,auto@2.5",
        kernel_set="cuda",
        geometry=dict(width=1920, heads=30),
        methods="full",
    )
    assert [(c["dp"], c.get("route"), c.get("keep_ratio")) for c in configs] == [
        (False, None, None),
        (True, "auto", None),
        (True, "auto", 2.5),
    ]
    assert all(
        (c["method"], c["k"], c["rows"], c["width"], c["heads"]) == ("full", 1, 8, 1920, 30) for c in configs
    )


# The aten operation behind each function that CudaAutocast runs in float32.
FLOAT32_OPS = {
    F.layer_norm: "aten::layer_norm",
    torch.layer_norm: "aten::layer_norm",
    F.group_norm: "aten::group_norm",
    torch.group_norm: "aten::group_norm",
    F.interpolate: "aten::upsample_nearest2d",
    torch.exp: "aten::exp",
    torch.Tensor.exp: "aten::exp",
    torch.rsqrt: "aten::rsqrt",
    torch.Tensor.rsqrt: "aten::rsqrt",
    F.softmax: "aten::softmax.int",
    torch.softmax: "aten::softmax.int",
    torch.Tensor.softmax: "aten::softmax.int",
    F.log_softmax: "aten::log_softmax.int",
    torch.log_softmax: "aten::log_softmax.int",
    torch.Tensor.log_softmax: "aten::log_softmax.int",
    torch.cumsum: "aten::cumsum",
    torch.Tensor.cumsum: "aten::cumsum",
    torch.sum: "aten::sum.dim_IntList",
    torch.Tensor.sum: "aten::sum.dim_IntList",
    torch.linalg.vector_norm: "aten::linalg_vector_norm",
}


def test_the_float32_rules_are_those_of_cuda_autocast_and_not_of_cpu_autocast():
    """Each function CudaAutocast runs in float32 is an operation that this torch's dispatcher gives a CUDA autocast
    kernel and no CPU one: the rules replay what only CUDA does."""
    assert set(FLOAT32_OPS) == set(FLOAT32_ON_CUDA)
    for op in set(FLOAT32_OPS.values()):
        dump = torch._C._dispatch_dump(op)
        assert "AutocastCUDA:" in dump and "AutocastCPU:" not in dump, op


@pytest.mark.parametrize(
    ("call", "copies"),
    [
        (lambda x: F.group_norm(x, 4), 1),
        (lambda x: F.layer_norm(x, (8,)), 1),
        (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), 1),
        (lambda x: x.sum(-1), 0),
        (lambda x: torch.softmax(x, -1), 1),  # softmax's dtype converts its input first (bf16, on CUDA too)
        (lambda x: F.interpolate(x, scale_factor=2, mode="area"), None),
    ],
)
def test_cuda_autocast_casts_norms_and_upsampling_and_gives_sums_a_float32_result(call, copies):
    """The "cast" rule copies a bf16 input to float32 (one copy kernel), the "dtype" rule passes a float32 dtype
    (a sum reads bf16 as it is); CPU autocast alone, and "area" interpolation (an adaptive pooling), keep bf16."""
    x = torch.randn(2, 8, 4, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert call(x).dtype == torch.bfloat16
        with CudaAutocast(), Traffic() as traffic:
            out = call(x)
    assert out.dtype == (torch.bfloat16 if copies is None else torch.float32)
    assert traffic.by_op.get("_to_copy.default", [0])[0] == (copies or 0)
    with CudaAutocast():  # no autocast: nothing changes
        assert call(x).dtype == torch.bfloat16


def _decoder_bytes(fn, x: torch.Tensor, *, grad: bool) -> int:
    with torch.set_grad_enabled(grad), CudaAutocast(), Traffic() as traffic:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x)
    return traffic.bytes


def test_the_decoder_s_norm_and_silu_move_8_bytes_per_entry_where_cuda_autocast_moved_28():
    """Without autograd under autocast, a bf16 map's GroupNorm and SiLU stay in bf16: the norm reads and writes it
    (4 bytes per entry) and SiLU overwrites it (4). CUDA autocast's float32 norm (the path with autograd) copies it to
    float32 (6), normalises in float32 (8), SiLU in float32 (8) and the next convolution's cast back (6). Per
    (example, group) two float32 statistics; per channel the affine parameters and their casts."""
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    x = torch.randn(2, 64, 32, 32).to(torch.bfloat16)
    ours = _decoder_bytes(lambda t: vqvae._norm_silu(norm, t), x, grad=False)
    cast_back = lambda t: vqvae._norm_silu(norm, t).to(torch.bfloat16)  # noqa: E731
    cuda = _decoder_bytes(cast_back, x, grad=True)
    small = 2 * 2 * 32 * 4 + 64 * 4 * 6  # statistics; parameters read, cast and read again
    assert abs(ours - 8 * x.numel()) <= small
    assert abs(cuda - 28 * x.numel()) <= small


def test_the_decoder_s_upsampling_moves_40_bytes_per_entry_fewer_than_under_cuda_autocast():
    """Nearest upsampling of a bf16 map in bf16: read 2, write 4 x 2 bytes per input entry, and the convolution
    reads the bf16 result. CUDA autocast: a float32 copy (2 + 4), a float32 upsampling (4 + 16) and the
    convolution's cast back (16 + 8): 40 bytes more per input entry; the convolution itself the same."""
    upsample = vqvae.Upsample2x(32)
    x = torch.randn(2, 32, 16, 16).to(torch.bfloat16)
    ours = _decoder_bytes(upsample, x, grad=False)
    cuda = _decoder_bytes(upsample, x, grad=True)
    assert cuda - ours == 40 * x.numel()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with CudaAutocast():
            fast = upsample(x)
        reference = upsample.conv(F.interpolate(x.float(), scale_factor=2, mode="nearest").to(torch.bfloat16))
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)  # the copies are exact in any dtype


def test_a_bf16_decode_is_as_close_to_float32_as_cuda_autocast_s_float32_norms():
    """The decode in bf16 norms (no autograd, under autocast) against the float32 decoder, beside CUDA autocast's
    path (float32 norms, SiLU and upsampling; the convolutions in bf16 in both): its mean error may exceed theirs by
    the rounding of the norms' output before SiLU: 7% on this model (8% on the official layout at 32 channels),
    allowed 25%."""
    torch.manual_seed(0)
    model = build_vqvae(vocab_size=64, z_channels=32, ch=32, patch_nums=(1, 2, 4)).eval()
    f_hat_BChw = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.fhat_to_img(f_hat_BChw)
        with CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model.fhat_to_img(f_hat_BChw).float()
    with torch.enable_grad(), CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
        cuda = model.decoder(model.post_quant_conv(f_hat_BChw)).clamp(-1, 1).detach().float()
    ours_error, cuda_error = (ours - reference).abs().mean(), (cuda - reference).abs().mean()
    assert 0 < ours_error <= 1.25 * cuda_error


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_encode_or_a_decode_without_autograd_holds_three_full_size_maps_at_most(channels_last):
    """The tokenizer's peak without autograd is three maps of its largest size (a block's input, a norm's output,
    a convolution's), the image and the latent aside; the original VAR code holds four, and a helper running each
    level (the level's input kept by the caller) with two statements per residual block had held five. The
    outputs are those of the module-by-module reference."""
    torch.manual_seed(0)
    model = build_vqvae(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 4)).eval()
    img_B3HW = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    largest = 2 * 32 * 64 * 64 * 4  # B x ch x the image's size, float32: the first and last levels' maps
    img_B3HW = img_B3HW.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    with torch.no_grad():
        with LiveTensorBytes() as encode:
            f_BChw = model.img_to_f(img_B3HW)
        with LiveTensorBytes() as decode:
            img = model.fhat_to_img(f_BChw, channels_last=channels_last)
        reference = model.decoder.conv_in(model.post_quant_conv(f_BChw))
        for name in ("block_1", "attn_1", "block_2"):
            reference = getattr(model.decoder.mid, name)(reference)
        for level in reversed(model.decoder.up):
            for i, block in enumerate(level.block):
                reference = block(reference)
                reference = level.attn[i](reference) if len(level.attn) else reference
            reference = level.upsample(reference) if hasattr(level, "upsample") else reference
        reference = model.decoder.conv_out(F.silu(model.decoder.norm_out(reference))).clamp(-1, 1)
    assert 2.5 * largest < encode.peak <= 3 * largest + f_BChw.nbytes
    assert 2.5 * largest < decode.peak <= 3 * largest + 2 * img.nbytes
    torch.testing.assert_close(img, reference, rtol=0, atol=1e-5)


def test_under_cuda_autocast_sampling_caches_bf16_keys_and_casts_none_of_the_cache(tiny_var):
    """A cached step writes q and k in bf16 from float32 norms: the KV cache holds bf16 keys, and the attention
    casts nothing of it (CUDA autocast's float32 F.normalize left float32 keys, every cached key cast again at every
    scale). What is still cast per step is its float32 input and the layers' weights and biases."""
    attn = tiny_var.blocks[0].attn
    cache, g = KVCache(), torch.Generator().manual_seed(0)
    for tokens in (1, 4, 9):
        x_BlC = torch.randn(2, tokens, attn.mat_qkv.in_features, generator=g)
        with torch.no_grad(), CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
            with Traffic() as traffic:
                attn.step(x_BlC, kv_cache=cache)
    assert cache.k_BHlc.dtype == cache.v_BHlc.dtype == torch.bfloat16
    # float32 read (4 bytes) and bf16 written (2): the step's input, the weights and the biases (the qkv's 3C)
    cast = x_BlC.numel() + attn.mat_qkv.weight.numel() + attn.proj.weight.numel() + 4 * attn.proj.bias.numel()
    assert round(traffic.by_op["_to_copy.default"][1] * 1e9) == 6 * cast


def test_cuda_autocast_leaves_out_calls_and_given_dtypes_alone():
    """As CUDA autocast: an ``out=`` call is not cast (its output written in place, in its own dtype), and a dtype
    given by keyword or by position is kept."""
    x = torch.randn(2, 8, 4, 8).to(torch.bfloat16)
    out = torch.zeros_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocast():
        torch.exp(x, out=out)
        summed = torch.sum(x, -1, out=torch.empty(2, 8, 4, dtype=torch.bfloat16))
        by_position = torch.softmax(x, -1, torch.bfloat16)
        by_keyword = x.sum(-1, dtype=torch.bfloat16)
    torch.testing.assert_close(out, x.exp(), rtol=0, atol=0)
    assert summed.dtype == by_position.dtype == by_keyword.dtype == torch.bfloat16
