"""Book-keeping clipping against an independent reference: per-example gradients from plain autograd, one example at
a time, clipped and summed. Every linear route (Gram, direct with and without keeping the per-example gradients,
chunked or not) must give the same clipped sum; reference and book-keeping both run in float32, so the tolerance is
rtol 1e-4 with an absolute floor of 1e-6 x the largest entry."""

from __future__ import annotations

import copy

import pytest
import torch
from test_privacy import METHODS, loss_fn_for, make_data, make_model, make_vqvae, reference_grads

from trainables import bookkeeping
from trainables.bookkeeping import BookKeeping, linear_route
from trainables.methods import trainable_parameters

INDICES = [0, 3, 4, 9, 13, 17]


@pytest.fixture(scope="module")
def vqvae():
    return make_vqvae()


@pytest.fixture(scope="module")
def data():
    return make_data()


_REFERENCES: dict = {}


def reference(method: str, k: int, vqvae, data) -> dict[str, torch.Tensor]:
    """Per-example view-mean gradients [B, ...] by name (cached: the reference does not depend on the route)."""
    if (method, k) not in _REFERENCES:
        _REFERENCES[method, k] = reference_grads(make_model(method), vqvae, data, k, INDICES)
    return _REFERENCES[method, k]


def clipped_reference(per_example: dict[str, torch.Tensor], C: float) -> torch.Tensor:
    flat_BP = torch.cat([g.flatten(1) for g in per_example.values()], dim=1)
    c_B = (C / (flat_BP.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (c_B[:, None] * flat_BP).sum(0)


def bookkeeping_sum(
    method: str, k: int, vqvae, data, *, C: float, route: str, bf16: bool = False, indices=tuple(INDICES)
):
    var = make_model(method)
    keeper = BookKeeping(var, linear_route=route)
    loss_fn = loss_fn_for(var, vqvae, data, k, bf16=bf16)
    examples = keeper.clipped_sum(lambda: loss_fn(torch.tensor(indices)), max_grad_norm=C)
    assert examples == len(indices)
    return torch.cat([p.grad.flatten() for p in trainable_parameters(var).values()])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(
    "route",
    ["gram", "direct", "auto", "direct, one example per chunk", "gram, tiles of 4 rows, one per chunk"],
)
def test_clipped_sum_equals_clipped_per_example_autograd(method, k, route, vqvae, data, monkeypatch):
    """C lies between the middle two per-example norms: half the examples are clipped, half pass unchanged."""
    if route.endswith("chunk"):
        monkeypatch.setattr(bookkeeping, "CHUNK_BYTES", 1)
    if "tiles" in route:  # the tiny model's rows: 4 tiles of uneven sizes instead of one whole Gram matrix
        monkeypatch.setattr(bookkeeping, "GRAM_TILE_ROWS", 4)
    per_example = reference(method, k, vqvae, data)
    norms_B = torch.cat([g.flatten(1) for g in per_example.values()], dim=1).norm(dim=1)
    sorted_B = norms_B.sort().values
    C = sorted_B[len(INDICES) // 2 - 1 : len(INDICES) // 2 + 1].mean().item()
    assert (norms_B < C).sum() == (norms_B > C).sum() == len(INDICES) // 2
    expected = clipped_reference(per_example, C)
    got = bookkeeping_sum(method, k, vqvae, data, C=C, route=route.split(",")[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.fixture(params=["upcast", "native"])
def half_path(request, monkeypatch):
    """The CPU's upcasting path, and the native-half path CUDA takes (bf16 products, one-pass norms, clipped sums
    weighted by c's bf16 parts) run here on the CPU's kernels."""
    if request.param == "native":
        monkeypatch.setattr(bookkeeping, "NATIVE_HALF_DEVICES", ("cpu",))
    return request.param


@pytest.mark.parametrize("route", ["gram", "direct"])
@pytest.mark.parametrize("k", [1, 3])
def test_each_route_bounds_one_example_by_C_under_bf16_autocast(route, k, vqvae, data, half_path):
    """bf16 forwards: a and g arrive in bf16, the norms are still float32 (a bf16 norm could overshoot C by 0.4%)."""
    C = 1e-3
    for i in range(4):
        one = bookkeeping_sum("full", k, vqvae, data, C=C, route=route, bf16=True, indices=[i])
        assert 0.99 * C < one.norm() <= C * (1 + 1e-5), (i, one.norm() / C)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_clipped_sum_under_bf16_autocast_is_that_of_autocast_autograd(method, vqvae, data, half_path):
    """Under autocast a linear layer multiplies a bf16 copy of its float32 input, and that product's gradient is
    what gets clipped. Reference: per-example gradients of plain autograd under the same autocast. Both round the
    same bf16 operands, autograd its weight gradient to bf16 once more: measured 1.3e-3 (LoRA) and 1.7e-3 (full)
    apart in relative L2 norm, against 6.1e-3 and 3.9e-3 from the float32 reference."""
    per_example = reference_grads(make_model(method), vqvae, data, 1, INDICES, bf16=True)
    norms_B = torch.cat([g.flatten(1) for g in per_example.values()], dim=1).norm(dim=1)
    C = norms_B.median().item()
    expected = clipped_reference(per_example, C)
    got = bookkeeping_sum(method, 1, vqvae, data, C=C, route="auto", bf16=True)
    assert (got - expected).norm() <= 3e-3 * expected.norm()


@pytest.mark.parametrize("bf16", [True, False])
def test_linear_inputs_are_held_as_the_product_used_them(bf16, vqvae, data):
    """What book-keeping holds from the forward to the backward: each linear layer's input in the dtype of its
    product (a bf16 copy under autocast: half the bytes of the float32 input; without autocast the input itself, no
    copy). Full fine-tuning's VAR has float32 inputs (ada_lin's condition, word_embed's features) and, under
    autocast, bf16 ones (the modulated streams, GELU, attention)."""
    var = make_model("full")
    keeper = BookKeeping(var)
    loss_fn = loss_fn_for(var, vqvae, data, 1, bf16=bf16)
    held = {}

    def forward():
        losses = loss_fn(torch.tensor(INDICES))
        held.update({m: a.dtype for m, a in keeper.inputs.items() if isinstance(m, torch.nn.Linear)})
        return losses

    keeper.clipped_sum(forward, max_grad_norm=1.0)
    expected = torch.bfloat16 if bf16 else torch.float32
    assert len(held) > 8 and set(held.values()) == {expected}


def test_route_rule_at_var_d16_geometry():
    """Where a per-example gradient cannot be kept, the cheaper of the two norm routes at width 1024 and 680
    positions: Gram matrices in 4 row tiles of 170 (0.625 of the whole products) for the 1024 x 1024 projection and
    the wider qkv and MLP layers, direct for LoRA's factors; with 32 views (T = 21,760) every layer goes direct."""
    T, C = 680, 1024
    assert bookkeeping.gram_tiles(T) == 4 and bookkeeping.gram_tiles(100) == 1
    for in_features, out_features in ((C, C), (C, 3 * C), (C, 4 * C), (4 * C, C)):
        assert linear_route(positions=T, in_features=in_features, out_features=out_features) == "gram"
        assert linear_route(positions=32 * T, in_features=in_features, out_features=out_features) == "direct"
    assert linear_route(positions=T, in_features=C, out_features=16) == "direct"
    assert linear_route(positions=T, in_features=16, out_features=3 * C) == "direct"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_var_d16_to_d30_keep_every_per_example_gradient_at_one_view(dtype):
    """At 680 positions every linear layer of VAR-d16 to d30 (qkv, projection, MLP, head; d30's MLP: 1920 <-> 7680,
    2.26x its a and g) keeps its per-example gradient, so full fine-tuning's DP step adds no Gram products. AdaLN's
    modulation (one position per example: 7 D^2 / 7 D) does not, nor does a layer beyond the ratio."""
    for C in (1024, 1280, 1536, 1920):
        for in_features, out_features in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, 4096)):
            a_R, g_R = torch.empty(1, in_features, dtype=dtype), torch.empty(1, out_features, dtype=dtype)
            assert bookkeeping._keeps_direct(positions=680, a_R=a_R, g_R=g_R), (in_features, out_features)
    a_R, g_R = torch.empty(1, 1920, dtype=dtype), torch.empty(1, 6 * 1920, dtype=dtype)
    assert not bookkeeping._keeps_direct(positions=1, a_R=a_R, g_R=g_R)
    a_R, g_R = torch.empty(1, 2560, dtype=dtype), torch.empty(1, 4 * 2560, dtype=dtype)  # 3.0x
    assert not bookkeeping._keeps_direct(positions=680, a_R=a_R, g_R=g_R)


@pytest.mark.parametrize("route", ["gram", "direct, kept", "direct"])
def test_norms_of_a_d16_sized_layer_are_float64_accurate(route):
    """Squared per-example norms of a 1024 -> 3072 layer over 680 positions against float64: within 1e-5 relative
    for every route. An einsum dot product over the 3.1 M entries of a per-example gradient missed by 2.4e-3 (both
    direct routes fail on that code): enough for a clipped gradient to exceed C by 0.1%. Measured now: 1e-7 (direct),
    3e-7 (Gram, 4 tiles; up to 1.9e-5 with whole Gram matrices and an einsum)."""
    generator = torch.Generator().manual_seed(0)
    a_BTi = torch.randn(2, 680, 1024, generator=generator)
    g_BTo = torch.randn(2, 680, 3072, generator=generator)
    exact_B = (g_BTo.double().transpose(1, 2) @ a_BTi.double()).square().sum((1, 2))
    if route == "gram":
        got_B = bookkeeping._gram_norms(a_BTi, g_BTo, 1)
    else:
        keep_as = torch.float32 if route.endswith("kept") else None
        got_B = bookkeeping._direct_norms(a_BTi, g_BTo, 1, keep_as=keep_as)[0]
    assert ((got_B.double() - exact_B).abs() / exact_B).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kept_gradients_take_the_operands_precision_and_their_norms_are_of_what_is_summed(dtype):
    """A projection whose per-example gradient fits in its a and g: kept in bf16 when a and g are bf16 (autocast's
    weight gradients are bf16 too; a float32 copy would not fit and would send the layer through Gram matrices),
    in float32 otherwise. The norms are those of the stored values, which the clipped sum adds."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 32, bias=False)
    a_R = torch.randn(2, 40, 32, generator=generator).to(dtype)
    g_R = torch.randn(2, 40, 32, generator=generator).to(dtype)
    sq_B, kept = bookkeeping._linear_norms(layer, a_R, g_R, 1, trainable={layer.weight})
    grad_Boi = kept[layer.weight]
    assert grad_Boi.dtype == dtype and "a" not in kept
    torch.testing.assert_close(sq_B, grad_Boi.float().square().sum((1, 2)), rtol=1e-6, atol=0)
    exact_Boi = g_R.double().transpose(1, 2) @ a_R.double()
    assert ((grad_Boi.double() - exact_Boi).norm() / exact_Boi.norm()) < (
        4e-3 if dtype == torch.bfloat16 else 1e-6
    )
    c_B = torch.tensor([0.3, 1.0])
    c_bf16_B = bookkeeping.bfloat16_toward_zero(c_B)
    (term,) = bookkeeping._kept_clipped(kept, c_B, c_bf16_B)[layer.weight]
    assert isinstance(term, bookkeeping.WeightedRows) and term.rows_B is grad_Boi  # not formed, not copied
    c_eff_B = c_bf16_B.float() if dtype == torch.bfloat16 else c_B  # 0.3 is no bf16 number: it moves
    assert (c_eff_B[0] < c_B[0]) == (dtype == torch.bfloat16)
    expected = (c_eff_B[:, None, None] * grad_Boi.float()).sum(0)
    torch.testing.assert_close(bookkeeping.formed([term]), expected)
    noise = torch.randn(expected.shape, generator=generator)
    into = noise.clone()
    bookkeeping.add_term(into, term, alpha=0.25)
    torch.testing.assert_close(into, noise + 0.25 * expected)


def test_clipping_factors_in_bfloat16_never_exceed_float32_ones():
    """A bf16 per-example gradient is weighted by c in bf16 rounded toward zero: never above c (the sensitivity
    stays C), within 2^-7 of it relatively, 1 exactly (an unclipped example is not shrunk). Rounding to nearest
    would overshoot by up to 2^-9."""
    c_B = torch.cat(
        [torch.rand(10_000, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 1e-30, 0.0])]
    )
    c_eff_B = bookkeeping.bfloat16_toward_zero(c_B)
    assert c_eff_B.dtype == torch.bfloat16 and c_eff_B.shape == c_B.shape
    c_eff_B = c_eff_B.double()
    assert (c_eff_B <= c_B.double()).all()
    assert ((c_B.double() - c_eff_B) <= 2**-7 * c_B.double()).all()
    assert c_eff_B[-3] == 1.0 and c_eff_B[-1] == 0.0
    assert ((c_B.double() - c_eff_B) > 2**-9 * c_B.double()).any()  # no finer rounding than bf16's
    assert (c_B.bfloat16().double() > c_B.double()).any()  # what rounding to nearest would have done


def test_a_matmul_without_float32_output_falls_back_to_the_upcast_product(monkeypatch):
    """The float32-output bmm is CUDA's (PyTorch 2.8+). Claimed for the CPU, where no kernel exists, the call fails
    once, is turned off for the device type, and the product is the upcast one: a torch without it costs copies,
    not the DP step."""
    monkeypatch.setitem(bookkeeping.NATIVE_FLOAT32_OUTPUT, "cpu", True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, generator=generator).bfloat16()
    y = torch.randn(2, 16, 8, generator=generator).bfloat16()
    y_t = (
        y.transpose(1, 2).contiguous().transpose(1, 2)
    )  # a transposed layout, as weight-gradient operands come
    got = bookkeeping._matmul_f32(x, y_t)
    assert got.dtype == torch.float32 and not bookkeeping.NATIVE_FLOAT32_OUTPUT["cpu"]
    # Exactly the upcast product of the same operands (the contiguous y took another BLAS kernel, which differed in
    # the last bit on some days); a bf16-rounded product would be off by ~1e-2.
    torch.testing.assert_close(got, x.float() @ y_t.float(), rtol=0, atol=0)
    torch.testing.assert_close(got, x.float() @ y.float(), rtol=1e-6, atol=1e-6)


def _assert_the_noise_gets_the_upcast_product() -> None:
    """A clipped sum of bf16 weighted rows added into float32 noise: the path is turned off for the CPU and the
    noise gets the upcast product of the same weights and rows."""
    generator = torch.Generator().manual_seed(0)
    rows_B = torch.randn(3, 4, 5, generator=generator).bfloat16()
    term = bookkeeping.WeightedRows(bookkeeping.bfloat16_toward_zero(torch.tensor([0.3, 1.0, 0.7])), rows_B)
    noise = torch.randn(4, 5, generator=generator)
    into = noise.clone()
    bookkeeping.add_term(into, term, alpha=0.5)
    assert not bookkeeping.NATIVE_FLOAT32_OUTPUT["cpu"]
    expected = noise + 0.5 * (term.weights_B.float()[:, None, None] * rows_B.float()).sum(0)
    torch.testing.assert_close(into, expected, rtol=1e-6, atol=1e-6)


def test_weighted_rows_without_float32_output_fall_back_to_the_upcast_product(monkeypatch):
    """The float32-output baddbmm that adds a clipped sum into the noise is CUDA's too: claimed for the CPU, it
    fails once (a probe on a tiny product, before anything is added), is turned off, and the noise gets the
    upcast product of the same bf16 weights and rows."""
    monkeypatch.setitem(bookkeeping.NATIVE_FLOAT32_OUTPUT, "cpu", True)
    monkeypatch.setattr(bookkeeping, "_PROBED", set())
    _assert_the_noise_gets_the_upcast_product()


def test_a_float32_output_product_that_drops_the_noise_is_never_used(monkeypatch):
    """Where the float32-output baddbmm runs but writes only the product (dropping what ``out`` held: the noise
    the clipped sum is added into), the probe's check against the upcast product turns it off before any step."""
    real_baddbmm = torch.baddbmm

    def drops_acc(acc, w, rows, *, out_dtype=None, beta=1.0, alpha=1.0, out=None):
        if out_dtype is None:
            return real_baddbmm(acc, w, rows, beta=beta, alpha=alpha)
        return out.copy_(alpha * (w.float() @ rows.float()))  # a faulty kernel: beta * acc lost

    monkeypatch.setattr(torch, "baddbmm", drops_acc)
    monkeypatch.setitem(bookkeeping.NATIVE_FLOAT32_OUTPUT, "cpu", True)
    monkeypatch.setattr(bookkeeping, "_PROBED", set())
    _assert_the_noise_gets_the_upcast_product()


@pytest.mark.parametrize("method", METHODS)
def test_clipped_gradients_carry_no_autograd_graph(method, vqvae, data):
    """The clipped sums are plain tensors. HeadScale's per-sample rule reads its parameter; with autograd on, its
    norms, then the clipping factors and every p.grad carried a graph that held float32 copies of each layer's input
    and weighted output gradient for as long as the gradients lived (measured: 187 MiB at depth 1, 4 rows)."""
    var = make_model(method)
    keeper = BookKeeping(var)
    loss_fn = loss_fn_for(var, vqvae, data, 1)
    keeper.clipped_sum(lambda: loss_fn(torch.tensor(INDICES)), max_grad_norm=1e-3)
    grads = [p.grad for p in trainable_parameters(var).values()]
    assert grads and all(g is not None and g.grad_fn is None and not g.requires_grad for g in grads)


def test_direct_route_releases_inputs_it_does_not_need(vqvae, data):
    """LoRA's factors on the token stream (attention, MLP) keep their per-example gradients: their inputs and output
    gradients are not held to the end. (ada_lin's factors see one position per row: there a and g are smaller.)"""
    var = make_model("lora")
    keeper = BookKeeping(var, linear_route="direct")
    loss_fn = loss_fn_for(var, vqvae, data, 3)
    seen = []
    original = keeper._write_clipped
    keeper._write_clipped = lambda **kw: (seen.append(copy.copy(keeper.kept)), original(**kw))[1]
    keeper.clipped_sum(lambda: loss_fn(torch.tensor(INDICES)), max_grad_norm=1.0)
    names = {m: name for name, m in var.named_modules()}
    linear_kept = [kept for m, kept in seen[0].items() if "lora_" in names[m] and "ada_lin" not in names[m]]
    assert len(linear_kept) == 16 and all("a" not in kept and "g" not in kept for kept in linear_kept)
    assert not keeper.inputs and not keeper.kept


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_the_queries_scales_get_each_example_s_gradient(k, bf16, vqvae, data):
    """The scales' per-example gradients are about 1e-8 in the tiny model, under every tolerance of the whole
    clipped sum, so they are compared here alone, with the scales off their start: book-keeping's (each row's gain
    gradient from the normalisation's backward, through the patch module's tap) against one example at a time
    autograd, to float32 rounding of the largest entry (under CPU bf16 autocast, to bf16 roundings of the
    queries)."""
    var = make_model("full")
    with torch.no_grad():
        for name, p in var.named_parameters():
            if name.endswith("scale_mul_1H11"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    expected = reference_grads(var, vqvae, data, k, INDICES, bf16=bf16)
    keeper = BookKeeping(var)
    seen = []
    original = keeper._write_clipped
    keeper._write_clipped = lambda **kw: (seen.append(copy.copy(keeper.kept)), original(**kw))[1]
    loss_fn = loss_fn_for(var, vqvae, data, k, bf16=bf16)
    keeper.clipped_sum(lambda: loss_fn(torch.tensor(INDICES)), max_grad_norm=1e6)
    names = {p: name for name, p in var.named_parameters()}
    got = {
        names[p]: g for kept in seen[0].values() for p, g in kept.items() if isinstance(p, torch.nn.Parameter)
    }
    scales = [name for name in expected if name.endswith("scale_mul_1H11")]
    assert len(scales) == 2 and all(expected[name].abs().min() > 0 for name in scales)
    for name in scales:
        scale = expected[name].abs().max()
        tol = 1e-2 if bf16 else 1e-5
        torch.testing.assert_close(got[name], expected[name], rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_no_output_gradient_ends_in_a_leaf_s_grad(method, vqvae, data):
    """Where nothing before a trainable layer needs a gradient (the first layers, the frozen queries' scale during
    book-keeping's backward), its output is made to want one for the hook; that gradient must end at the hook, not
    be copied into a leaf's ``.grad`` by AccumulateGrad (a first layer's whole [B, L, C] output gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Nodes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            node = torch._C._current_autograd_node()
            seen.append(node.name() if node is not None else "")
            return func(*args, **(kwargs or {}))

    var, seen = make_model(method), []
    keeper = BookKeeping(var)
    loss_fn = loss_fn_for(var, vqvae, data, 1)
    with Nodes():
        keeper.clipped_sum(lambda: loss_fn(torch.tensor(INDICES)), max_grad_norm=1.0)
    assert seen and "torch::autograd::AccumulateGrad" not in seen


def test_forcing_an_unknown_route_is_refused():
    with pytest.raises(ValueError, match="linear_route"):
        BookKeeping(make_model("lora"), linear_route="fast")


def test_a_parameter_shared_by_two_layers_is_refused_and_auto_resolves_to_opacus_hooks():
    """Tied weights (one parameter in an embedding and a linear): book-keeping added the layers' squared norms,
    where the example's gradient is their sum, and clipped contributions reached 1.3x C (1.4x with the views split
    over forwards, which also added the gradient twice). No adapted VAR ties weights; a direct caller's model may."""
    from bench.schema import PrivacyConfig
    from trainables.privacy import resolve_clipping

    embedding, head = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False)
    head.weight = embedding.weight
    tied = torch.nn.Sequential(embedding, head)
    with pytest.raises(NotImplementedError, match=r"tied weights: Embedding, Linear.*'hooks'"):
        BookKeeping(tied)
    privacy = PrivacyConfig(target_epsilon=8.0, sampling_rate=0.5, max_grad_norm=1.0, clipping="auto")
    assert resolve_clipping(privacy, tied) == "hooks"
    untied = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    assert resolve_clipping(privacy, untied) == "bookkeeping" and BookKeeping(untied).params
