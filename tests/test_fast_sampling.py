"""The generation fast path (issue 16) against the eager sampler it replaced.

The reference below is the sampler as it was before the fast path: AdaLN modulation recomputed at every scale,
a KV cache grown by concatenation, the q/v bias added after the qkv product and a filter that sorts all V
logits. The fast path must give the same filtered probabilities (float rounding), the same greedy tokens and,
at a fixed seed, the same drawn tokens.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_VAR, TINY_VQVAE

sys.path.insert(0, str(REPO / "scripts"))

from benchmark_dp_memory import CudaAutocast, Traffic

from bench.schema import MethodConfig
from trainables.methods import adapt
from trainables.models import KVCache, build_var, build_vqvae, release_sampling_caches, sample_top_k_top_p
from trainables.models.var import _sampling_caches, top_k_top_p_probs

PROB_ATOL = 1e-6  # float32 softmax over the same kept logits, summed in another order
IMAGE_ATOL = 1e-4  # same tokens; hidden states differ by float rounding only (fused bias, cached modulation)


@contextlib.contextmanager
def as_cuda_runs_it():
    """No autograd, CPU bf16 autocast with CUDA autocast's rules replayed: where ``Traffic`` counts kernels as a
    GPU evaluation launches them."""
    with torch.no_grad(), CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def reference_filtered_probs(logits_BlV: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """The former filter: mask below the k-th largest logit (ties kept), sort all V ascending for top-p."""
    V = logits_BlV.shape[-1]
    logits_BlV = logits_BlV.float()
    if 0 < top_k < V:
        kth_Bl1 = logits_BlV.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted_BlV = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted_BlV[..., -1] = False
        drop_BlV = drop_sorted_BlV.scatter(-1, order_BlV, drop_sorted_BlV)
        logits_BlV = logits_BlV.masked_fill(drop_BlV, -torch.inf)
    return logits_BlV.softmax(dim=-1).view(-1, V)


def reference_draw(logits_BlV, *, top_k, top_p, generator):
    B, l, _ = logits_BlV.shape  # noqa: E741
    probs_NV = reference_filtered_probs(logits_BlV, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs_NV, num_samples=1, generator=generator).view(B, l)


@torch.no_grad()
def reference_sample_tokens(var, label_B, *, vqvae, cfg, top_k, top_p, generator):
    """The former sampling loop: blocks' training forward with a growing cache, modulation at every scale."""
    B, S, full = label_B.shape[0], len(var.patch_nums), var.patch_nums[-1]
    cond_2BC = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.unconditional_label))))
    block_cond = var.shared_ada_lin(cond_2BC)
    lvl_pos_1LC = var.add_positions(var.lvl_embed(var.lvl_1L))
    x_2BlC = (
        var.add_start_position(cond_2BC[:, None].expand(-1, var.first_l, -1)) + lvl_pos_1LC[:, : var.first_l]
    )
    caches = [KVCache() for _ in var.blocks]
    f_hat_BChw = cond_2BC.new_zeros(B, var.z_channels, full, full)
    tokens, cur = [], 0
    for si, pn in enumerate(var.patch_nums):
        cur += pn * pn
        for block, cache in zip(var.blocks, caches):
            x_2BlC = block(x_2BlC, cond_BD=block_cond, attn_mask=None, kv_cache=cache)
        logits_2BlV = var.logits(x_2BlC, cond_2BC)
        t = cfg * si / (S - 1)
        logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
        idx_Bl = reference_draw(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)
        tokens.append(idx_Bl)
        h_BChw = vqvae.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, var.z_channels, pn, pn)
        f_hat_BChw, next_BChw = vqvae.quantize.next_autoregressive_input(si, f_hat_BChw, h_BChw)
        if si != S - 1:
            words_BlC = var.word_embed(next_BChw.flatten(2).transpose(1, 2))
            x_2BlC = (words_BlC + lvl_pos_1LC[:, cur : cur + var.patch_nums[si + 1] ** 2]).repeat(2, 1, 1)
    return tokens


def realistic_logits(seed: int = 0) -> torch.Tensor:
    """[4, 256, 4096]: the finest scale's guided logits of a batch of 4 at V = 4096, spread like a trained
    model's (a few hundred plausible codes, a long tail), so both the top-k and the top-p cut bite."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 256, 4096, generator=g) * 2.5 + torch.randn(4, 256, 1, generator=g)


@pytest.fixture
def nonzero_bias_var():
    """tiny VAR with nonzero q/v biases and head modulation, so the fused bias and cached modulation matter."""
    return strong_var()


def strong_var(**architecture) -> torch.nn.Module:
    """A tiny VAR (``TINY_VAR`` with ``architecture`` changes) whose tokens depend on every block's attention over
    the cached scales, on the q/v biases and on the modulation."""
    var = build_var(**(TINY_VAR | architecture), generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in var.blocks:
            block.attn.q_bias.copy_(torch.randn(block.attn.q_bias.shape, generator=g) * 0.3)
            block.attn.v_bias.copy_(torch.randn(block.attn.v_bias.shape, generator=g) * 0.3)
            # modulation of order 1 (gammas far from their 1e-3 init) and a head of order-1 logits: the tokens
            # then depend on every block's attention and modulation, not only on the input embeddings
            block.ada_lin[-1].weight.normal_(0.0, 0.1, generator=g)
            block.attn.scale_mul_1H11.fill_(4.0)  # sharp attention (softmax scale e^4): every key matters
        var.head.weight.mul_(50)
    return var


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(900, 0.96), (900, 0.0), (0, 0.96), (0, 0.0), (50, 0.5), (1, 0.9)]
)
def test_filtered_probs_match_reference(top_k, top_p):
    logits_BlV = realistic_logits()
    ours = top_k_top_p_probs(logits_BlV, top_k=top_k, top_p=top_p)
    theirs = reference_filtered_probs(logits_BlV, top_k=top_k, top_p=top_p)
    assert ours.shape == theirs.shape == (4 * 256, 4096)
    assert torch.equal(ours > 0, theirs > 0)  # the same codes kept
    assert (ours - theirs).abs().max().item() <= PROB_ATOL


@pytest.mark.parametrize(("top_k", "top_p"), [(900, 0.96), (900, 0.0), (50, 0.5), (50, 0.999), (1, 0.9)])
def test_filtered_probs_keep_ties_as_the_official_filter_does(top_k, top_p):
    """bf16 logits (autocast) tie often: every code tied with the k-th largest stays, as in the official sampler
    (topk alone kept exactly k: up to 9 fewer codes in 54 of 64 rows at k = 900). Where the top-p cut falls inside a
    group of ties, which of them go is the sort's arbitrary order in the official filter: the number of codes kept
    and the probabilities, as a multiset per row, are the same."""
    logits_BlV = realistic_logits().bfloat16().float()
    ours = top_k_top_p_probs(logits_BlV, top_k=top_k, top_p=top_p)
    theirs = reference_filtered_probs(logits_BlV, top_k=top_k, top_p=top_p)
    kth_N1 = logits_BlV.reshape(-1, 4096).topk(top_k, dim=-1).values[:, -1:]
    ties_N = (logits_BlV.reshape(-1, 4096) == kth_N1).sum(dim=-1)
    assert top_k == 1 or (ties_N > 1).float().mean() > 0.2  # the case is exercised (rarely at the top: k = 1)
    assert torch.equal((ours > 0).sum(dim=-1), (theirs > 0).sum(dim=-1))
    sorted_ours, sorted_theirs = ours.sort(dim=-1).values, theirs.sort(dim=-1).values
    assert (sorted_ours - sorted_theirs).abs().max().item() <= PROB_ATOL


def test_greedy_filter_takes_the_argmax():
    logits_BlV = realistic_logits(1)
    idx_Bl = sample_top_k_top_p(logits_BlV, top_k=1, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx_Bl, logits_BlV.argmax(dim=-1))


def test_draws_match_reference_at_a_fixed_seed():
    """Same multinomial call on the same-shaped probabilities: the same random numbers. A draw could only flip
    where a uniform falls within float rounding (~1e-7) of a cumulative boundary; none does here."""
    for seed in range(3):
        logits_BlV = realistic_logits(seed)
        ours = sample_top_k_top_p(
            logits_BlV, top_k=900, top_p=0.96, generator=torch.Generator().manual_seed(seed)
        )
        theirs = reference_draw(
            logits_BlV, top_k=900, top_p=0.96, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(ours, theirs)


def test_static_kv_cache_matches_growing_cache():
    g = torch.Generator().manual_seed(0)
    static, growing = KVCache(capacity=14), KVCache()
    for length in (1, 4, 9):
        k_BHlc, v_BHlc = torch.randn(2, 3, length, 5, generator=g), torch.randn(2, 3, length, 5, generator=g)
        for ours, theirs in zip(static.extend(k_BHlc, v_BHlc), growing.extend(k_BHlc, v_BHlc)):
            assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="cannot hold"):
        static.extend(torch.zeros(2, 3, 1, 5), torch.zeros(2, 3, 1, 5))


def test_compiled_cuda_sampling_keeps_one_cache_set_per_batch_size_until_released():
    """Compiled CUDA sampling reuses its static KV caches per (model, batch size, autocast) so CUDA graphs may write
    them in place; every batch size's set stays held, so a caller measuring several sizes releases them between
    (the GPU benchmark at batch 512, 256, 128, 64 would otherwise hold all four sets). Nothing is allocated until a
    step writes, so the bookkeeping is checked here without a GPU."""
    var = build_var(**TINY_VAR)
    cuda = torch.device("cuda")
    first = _sampling_caches(var, batch=4, device=cuda, compiled=True)
    assert _sampling_caches(var, batch=4, device=cuda, compiled=True) is first  # reused: fixed addresses
    other = _sampling_caches(var, batch=8, device=cuda, compiled=True)
    assert other is not first and len(other) == len(first) == var.depth
    release_sampling_caches(var)
    assert _sampling_caches(var, batch=4, device=cuda, compiled=True) is not first
    assert (
        _sampling_caches(var, batch=4, device=torch.device("cpu"), compiled=True) is not first
    )  # CPU: fresh
    release_sampling_caches(build_var(**TINY_VAR))  # a model that holds none: nothing to do


def test_fused_qkv_bias_matches_module_path(nonzero_bias_var):
    attn = nonzero_bias_var.blocks[0].attn
    x_BlC = torch.randn(2, 9, attn.mat_qkv.in_features)
    with torch.no_grad():
        fused = attn.qkv_with_bias(x_BlC)
        modules = attn.add_qkv_bias(attn.mat_qkv(x_BlC))
    assert (fused - modules).abs().max().item() <= 1e-5
    calls = []
    handle = attn.mat_qkv.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        attn.qkv_with_bias(x_BlC)
    handle.remove()
    assert calls == [1]  # a hooked (or LoRA-wrapped) mat_qkv is called as a module


@pytest.mark.parametrize(
    ("cfg", "top_k", "top_p"), [(1.5, 1, 0.0), (1.5, 5, 0.6), (0.0, 0, 0.0), (2.0, 0, 0.5)]
)
def test_sampler_draws_match_reference(nonzero_bias_var, tiny_vqvae, cfg, top_k, top_p):
    labels = torch.tensor([0, 3, 5, 1])
    kw = dict(vqvae=tiny_vqvae, cfg=cfg, top_k=top_k, top_p=top_p)
    ours = nonzero_bias_var.sample_tokens(labels, generator=torch.Generator().manual_seed(7), **kw)
    theirs = reference_sample_tokens(
        nonzero_bias_var, labels, generator=torch.Generator().manual_seed(7), **kw
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _own_scale_attention(q, k, v, **options):
    """Attention of the step's queries over their own scale's keys alone: a sampler that ignores the KV cache."""
    length = q.shape[2]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, -length:], v[:, :, -length:], **options
    )


def test_compiled_sampling_matches_eager(monkeypatch):
    """torch.compile'd scale steps (inductor on CPU) against eager, on 3 scales (1, 2, 4) to keep the compile
    short: greedy tokens identical, then images within IMAGE_ATOL; a non-greedy filter draws the same tokens.
    The model's tokens depend on the cached scales (checked: a sampler that ignores the cache draws others), so
    equal tokens say the compiled steps read the cache as eager ones do."""
    import trainables.models.var as var_module

    patch_nums = (1, 2, 4)
    var = strong_var(patch_nums=patch_nums)
    torch.manual_seed(0)
    vqvae = build_vqvae(**(TINY_VQVAE | {"patch_nums": patch_nums})).eval()
    labels, started = torch.tensor([0, 3, 5]), time.perf_counter()
    for top_k, top_p in ((1, 0.0), (5, 0.6)):
        kw = dict(vqvae=vqvae, cfg=1.5, top_k=top_k, top_p=top_p)
        eager = var.sample_tokens(labels, generator=torch.Generator().manual_seed(3), **kw)
        with monkeypatch.context() as patched:
            # the module's torch.nn.functional, with attention over the step's own scale only
            functional = vars(torch.nn.functional)
            cacheless = SimpleNamespace(
                **{**functional, "scaled_dot_product_attention": _own_scale_attention}
            )
            patched.setattr(var_module, "F", cacheless)
            blind = var.sample_tokens(labels, generator=torch.Generator().manual_seed(3), **kw)
        assert not torch.equal(eager[-1], blind[-1]), (top_k, top_p)
        fast = var.sample_tokens(labels, generator=torch.Generator().manual_seed(3), compiled=True, **kw)
        assert all(torch.equal(a, b) for a, b in zip(eager, fast))
    # Two labels padded to the compiled batch of 3 (no compile: its graphs exist) draw what two unpadded draw.
    kw = dict(vqvae=vqvae, cfg=1.5, top_k=5, top_p=0.6)
    eager = var.sample_tokens(labels[:2], generator=torch.Generator().manual_seed(4), **kw)
    fast = var.sample_tokens(
        labels[:2], generator=torch.Generator().manual_seed(4), compiled=True, pad_to=3, **kw
    )
    assert all(torch.equal(a, b) for a, b in zip(eager, fast))
    kw = dict(vqvae=vqvae, cfg=1.5, top_k=1, top_p=0.0)
    eager = var.sample(labels, generator=torch.Generator().manual_seed(0), **kw)
    fast = var.sample(labels, generator=torch.Generator().manual_seed(0), compiled=True, **kw)
    assert (eager - fast).abs().max().item() <= IMAGE_ATOL
    print(f"compiled sampling test: {time.perf_counter() - started:.1f} s")


def test_padded_sampling_draws_the_unpadded_batch_s_codes_and_images(tiny_var, tiny_vqvae):
    """pad_to: the padding rows take no draw from the generator and are not decoded, so a padded call's real rows
    are the unpadded call's (a filter that samples: the random stream must match row for row)."""
    labels, kw = torch.tensor([1, 4, 2]), dict(vqvae=tiny_vqvae, cfg=1.5, top_k=10, top_p=0.9)
    plain = tiny_var.sample_tokens(labels, generator=torch.Generator().manual_seed(5), **kw)
    padded = tiny_var.sample_tokens(labels, generator=torch.Generator().manual_seed(5), pad_to=7, **kw)
    assert all(torch.equal(a, b) for a, b in zip(plain, padded)) and padded[-1].shape[0] == 3
    images = [
        tiny_var.sample(labels, generator=torch.Generator().manual_seed(5), pad_to=p, **kw) for p in (None, 7)
    ]
    assert images[1].shape == images[0].shape and (images[0] - images[1]).abs().max().item() <= IMAGE_ATOL
    with pytest.raises(ValueError, match="pad_to"):
        tiny_var.sample(labels, generator=torch.Generator(), pad_to=2, **kw)


@pytest.mark.parametrize("channels_last", [None, False, True])
def test_fast_decode_matches_reference_decoder(tiny_vqvae, channels_last):
    """fhat_to_img without autograd (in-place SiLU and residual adds; channels-last on CPU by default, either
    layout when asked) against the decoder run with autograd on the NCHW latent (allocating every intermediate):
    the same images up to IMAGE_ATOL."""
    f_hat_BChw = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    layouts = []
    tiny_vqvae.post_quant_conv.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        fast = tiny_vqvae.fhat_to_img(f_hat_BChw, channels_last=channels_last)
    assert layouts == [channels_last is not False]  # the CPU's default is channels-last
    with torch.enable_grad():
        reference = tiny_vqvae.decoder(tiny_vqvae.post_quant_conv(f_hat_BChw)).clamp(-1, 1).detach()
    assert fast.is_contiguous() and fast.shape == reference.shape == (3, 3, 16, 16)
    assert (fast - reference).abs().max().item() <= IMAGE_ATOL


@pytest.mark.parametrize("autocast", [False, True])
def test_cached_step_gives_the_training_forward_s_attention_bit_for_bit(tiny_var, autocast):
    """Sampling's cached step normalises q and k as the training forward does (one pass, float32 norms, the result
    in the attention's dtype under autocast): scale by scale its output equals the forward's with autograd, where the
    published F.normalize and product differed by float rounding (bf16 norms under CPU autocast). Under autocast
    the KV cache then holds keys in bf16, which the attention reads without a cast."""
    attn = tiny_var.blocks[0].attn
    with torch.no_grad():
        attn.scale_mul_1H11.fill_(2.0)  # a gain other than 1
    g = torch.Generator().manual_seed(0)
    step_cache, forward_cache = KVCache(), KVCache()
    for tokens in (1, 4, 9):
        x_BlC = torch.randn(2, tokens, attn.mat_qkv.in_features, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                sampled = attn.step(x_BlC, kv_cache=step_cache)
            trained = attn(x_BlC, attn_mask=None, kv_cache=forward_cache)
        assert trained.requires_grad
        torch.testing.assert_close(sampled, trained.detach(), rtol=0, atol=0)
    assert step_cache.k_BHlc.dtype == (torch.bfloat16 if autocast else torch.float32)


def _attention_steps(attn, *, autocast: bool, per_call: bool, capacity: int = 0) -> list[torch.Tensor]:
    """Three scales of ``attn``'s cached step (1, 4, 9 tokens, seeded inputs), under CPU bf16 autocast or not;
    ``per_call``: with ``sampling_constants`` made once, as ``sample`` does, else made by every step;
    ``capacity``: the KV cache's (0: growing); the cached keys and values follow the steps' outputs."""
    g, cache, outs = torch.Generator().manual_seed(0), KVCache(capacity=capacity), []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        constants = attn.sampling_constants("cpu") if per_call else None
        for tokens in (1, 4, 9):
            x_BlC = torch.randn(2, tokens, attn.mat_qkv.in_features, generator=g)
            outs.append(attn.step(x_BlC, kv_cache=cache, constants=constants))
    length = 1 + 4 + 9
    return outs + [cache.k_BHlc[:, :, :length], cache.v_BHlc[:, :, :length]]


def _varied_queries_gain(attn) -> None:
    """A gain per head other than 1, one of them past the clamp at ln 100."""
    with torch.no_grad():
        gain = (attn if attn.head_scale is None else attn.head_scale).scale_mul_1H11
        gain.copy_(torch.tensor([2.0, 5.0]).view(1, -1, 1, 1).expand_as(gain))


@pytest.mark.parametrize("method", ["base", "frozen", "lora"])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_step_given_the_call_s_constants_equals_one_making_them(tiny_var, method, autocast):
    """The q/v biases, the queries' gain and frozen weights' casts, made once per sampling call, give every
    scale's step the bits it made itself; plain, frozen, and through LoRA's folded bias (an adapted model, whose
    patch modules hold the biases)."""
    var = copy.deepcopy(tiny_var)
    if method == "frozen":
        var.requires_grad_(False)
    if method == "lora":
        adapt(var, MethodConfig(name="lora", lora_rank=4), num_classes=3, seed=0)
    attn = var.blocks[0].attn
    with torch.no_grad():
        owner = attn if attn.qkv_bias is None else attn.qkv_bias
        owner.q_bias.normal_(generator=torch.Generator().manual_seed(1))
        owner.v_bias.normal_(generator=torch.Generator().manual_seed(2))
    _varied_queries_gain(attn)
    per_call = _attention_steps(attn, autocast=autocast, per_call=True)
    for ours, theirs in zip(per_call, _attention_steps(attn, autocast=autocast, per_call=False)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_sampling_step_makes_nothing_of_the_parameters_alone(tiny_var):
    """Counted as CUDA runs it: with the call's constants a cached step launches 4 kernels fewer (the biases'
    concatenation and cast, the gain's clamp and exp), none of them a function of the scale's tokens."""
    attn = tiny_var.blocks[0].attn
    x_BlC = torch.randn(2, 4, attn.mat_qkv.in_features, generator=torch.Generator().manual_seed(0))
    counted = {}
    for per_call in (False, True):
        with as_cuda_runs_it():
            constants = attn.sampling_constants("cpu") if per_call else None
            attn.step(x_BlC, kv_cache=KVCache(), constants=None)  # the weights' casts, cached for the call
            with Traffic() as traffic:
                attn.step(x_BlC, kv_cache=KVCache(), constants=constants)
        counted[per_call] = {name: kernels for name, (kernels, _, _) in traffic.by_op.items()}
    assert sum(counted[False].values()) - sum(counted[True].values()) == 4
    assert {"cat.default", "exp.default", "clamp_max.default"}.isdisjoint(counted[True])
    assert counted[False]["_to_copy.default"] - counted[True].get("_to_copy.default", 0) == 1


def test_a_lora_model_samples_with_no_more_kernels_than_its_base(tiny_var, tiny_vqvae):
    """Counted as CUDA runs it (bf16 autocast, after a first call): a LoRA-adapted model's sampling call launches
    no adapter product, cast or copy per layer (each layer one product with its merged weight), so no more kernels
    than the base model, which casts its weights once per call."""
    adapted = copy.deepcopy(tiny_var)
    adapt(adapted, MethodConfig(name="lora", lora_rank=4), num_classes=tiny_var.num_classes, seed=0)
    counted = {}
    for name, var in (("base", tiny_var), ("lora", adapted.eval())):
        label_B = torch.tensor([0, 1])
        for _call in range(2):  # the first makes what a model keeps between calls; the second is counted
            with as_cuda_runs_it():
                with Traffic() as traffic:
                    var.sample_tokens(label_B, vqvae=tiny_vqvae, cfg=1.5, top_k=3, top_p=0.5)
        counted[name] = traffic
    assert {"addmm_.default", "addmm.out"}.isdisjoint(counted["lora"].by_op)
    assert counted["lora"].kernels <= counted["base"].kernels


def _autocast_samples(var, vqvae) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens and images of one seeded sampling call under CPU bf16 autocast."""
    kw = dict(vqvae=vqvae, cfg=1.5, top_k=3, top_p=0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = var.sample_tokens(torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(4), **kw)
        images = var.sample(torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(4), **kw)
    return tokens, images


@pytest.mark.parametrize("method", ["base", "ln_tuning"])
def test_frozen_weights_cast_once_per_call_sample_autocast_s_bits(tiny_var, tiny_vqvae, method):
    """Frozen linear weights (a base model's, an LN-tuning model's) cast once per sampling call by ``frozen_cast``
    give the bits autocast's own casts give: the same model with every weight trainable (autocast's cached casts)
    draws the same tokens and decodes the same images, exactly."""
    frozen = copy.deepcopy(tiny_var).requires_grad_(False)
    if method == "ln_tuning":
        adapt(frozen, MethodConfig(name="ln_tuning"), num_classes=tiny_var.num_classes, seed=0)
    trainable = copy.deepcopy(frozen).requires_grad_(True)
    assert (
        not frozen.blocks[0].ffn.fc1.weight.requires_grad and trainable.blocks[0].ffn.fc1.weight.requires_grad
    )
    frozen_tokens, frozen_images = _autocast_samples(frozen.eval(), tiny_vqvae)
    trainable_tokens, trainable_images = _autocast_samples(trainable.eval(), tiny_vqvae)
    assert all(torch.equal(a, b) for a, b in zip(frozen_tokens, trainable_tokens))
    torch.testing.assert_close(frozen_images, trainable_images, rtol=0, atol=0)


def test_a_frozen_model_samples_without_recasting_its_weights_at_each_scale(tiny_var, tiny_vqvae):
    """Counted as CUDA runs it (bf16 autocast): a model with frozen linear weights casts each once per call, as
    autocast casts a trainable one, so its sampling call launches no more kernels than the trainable model's (a
    few fewer: matmul folds word_embed's non-contiguous input without a copy where the weight needs no grad); the
    same weights cast at every scale launched one cast per weight and bias, per layer and scale, more."""
    frozen = copy.deepcopy(tiny_var).requires_grad_(False)
    counted = {}
    for name, var in (("trainable", tiny_var), ("frozen", frozen)):
        with as_cuda_runs_it():
            with Traffic() as traffic:
                var.sample_tokens(torch.tensor([0, 1]), vqvae=tiny_vqvae, cfg=1.5, top_k=3, top_p=0.5)
        counted[name] = traffic
    assert counted["frozen"].kernels <= counted["trainable"].kernels
    casts = {name: traffic.by_op["_to_copy.default"][0] for name, traffic in counted.items()}
    assert casts["frozen"] == casts["trainable"]


@pytest.mark.parametrize("method", ["base", "lora"])
@pytest.mark.parametrize("per_call", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_step_into_static_buffers_equals_one_extending_a_growing_cache(
    tiny_var, autocast, per_call, method
):
    """A step writing its unit keys straight into a static KV cache (q's and k's norms in one reduction) gives the
    bits of one normalising q and k apart and appending them to a growing cache: outputs, keys and values, at three
    scales, in float32 and under autocast, with the call's constants or without, the gain held by the attention or
    by an adapted model's patch module."""
    var = copy.deepcopy(tiny_var)
    if method == "lora":
        adapt(var, MethodConfig(name="lora", lora_rank=4), num_classes=3, seed=0)
    attn = var.blocks[0].attn
    assert (attn.head_scale is not None) == (method == "lora")
    _varied_queries_gain(attn)
    static = _attention_steps(attn, autocast=autocast, per_call=per_call, capacity=20)
    growing = _attention_steps(attn, autocast=autocast, per_call=per_call)
    assert static[-2].dtype == (torch.bfloat16 if autocast else torch.float32)
    for ours, theirs in zip(static, growing, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_step_into_static_buffers_normalises_q_and_k_in_one_reduction(tiny_var):
    """Counted as CUDA runs it: a sampling step with a static cache (as ``sample``'s) launches one norm and one
    clamp for q and k together and copies only the values into the cache (the keys are written there by their
    normalisation): three kernels fewer than normalising and appending them apart."""
    attn = tiny_var.blocks[0].attn
    x_BlC = torch.randn(2, 4, attn.mat_qkv.in_features, generator=torch.Generator().manual_seed(0))
    counted = {}
    for capacity in (0, 8):
        with as_cuda_runs_it():
            constants = attn.sampling_constants("cpu")
            cache = KVCache(capacity=capacity)
            # a first scale: the growing cache then concatenates
            attn.step(x_BlC[:, :1], kv_cache=cache, constants=constants)
            with Traffic() as traffic:
                attn.step(x_BlC[:, :4], kv_cache=cache, constants=constants)
        counted[capacity] = {name: kernels for name, (kernels, _, _) in traffic.by_op.items()}
    assert counted[8]["linalg_vector_norm.default"] == counted[8]["clamp_min.default"] == 1
    assert counted[8]["copy_.default"] == 1 and "cat.default" not in counted[8]
    assert counted[0]["linalg_vector_norm.default"] == counted[0]["clamp_min.default"] == 2
    # the growing cache's norms, clamps and two concatenations against one norm, one clamp and one copy
    assert sum(counted[8].values()) == sum(counted[0].values()) - 3


def test_a_step_into_static_buffers_forms_the_queries_gain_s_gradient(tiny_var):
    """With autograd on and only the queries' gain trainable, a step with a static cache takes the separate path
    (``out=`` writes have no gradient): the same output as with a growing cache, and the gain's gradient formed."""
    attn = copy.deepcopy(tiny_var.blocks[0].attn).requires_grad_(False)
    attn.scale_mul_1H11.requires_grad_(True)
    x_BlC = torch.randn(2, 4, attn.mat_qkv.in_features, generator=torch.Generator().manual_seed(0))
    outs = [attn.step(x_BlC, kv_cache=KVCache(capacity=capacity)) for capacity in (8, 0)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    outs[0].square().sum().backward()
    assert attn.scale_mul_1H11.grad is not None and attn.scale_mul_1H11.grad.abs().sum() > 0


def _hooked_modules(var, kind: str) -> list[torch.nn.Module]:
    if kind == "linear":  # every plain linear layer (an adapted model's LoRA layers wrap theirs)
        return [m for m in var.modules() if type(m) is torch.nn.Linear]
    if kind == "ffn":
        return [block.ffn for block in var.blocks]
    return [block.attn.head_scale for block in var.blocks]


@pytest.mark.parametrize(
    ("method", "kind"), [("frozen", "linear"), ("frozen", "ffn"), ("lora", "linear"), ("lora", "head_scale")]
)
def test_sampling_under_autocast_calls_every_hooked_module(tiny_var, tiny_vqvae, method, kind):
    """A hooked module (per-sample gradients' hooks) is called by a sampling call under autocast, not folded into
    the call's casts or the keys' normalisation into the cache: plain linear layers (each block's, the head, the
    word embedding), a block's FFN with unhooked layers inside, an adapted model's queries' scale module. Each
    kind hooked alone, so no hooked neighbour calls it instead."""
    var = copy.deepcopy(tiny_var).requires_grad_(False)
    if method == "lora":
        adapt(var, MethodConfig(name="lora", lora_rank=4), num_classes=var.num_classes, seed=0)
    hooked, calls = _hooked_modules(var, kind), {}
    assert hooked and all(m is not None for m in hooked)
    for module in hooked:
        module.register_forward_hook(lambda m, args, out: calls.__setitem__(m, calls.get(m, 0) + 1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        var.eval().sample_tokens(torch.tensor([0, 1]), vqvae=tiny_vqvae, cfg=1.5, top_k=3, top_p=0.5)
    scales = len(var.patch_nums)
    assert all(calls.get(module, 0) >= 1 for module in hooked)
    if kind == "linear":
        assert calls[var.head] == scales and calls[var.word_embed] == scales - 1
    else:
        assert all(calls[module] == scales for module in hooked)
