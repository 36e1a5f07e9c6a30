"""Multi-scale residual VQVAE of VAR (encoder, decoder, shared-phi quantiser).

State-dict compatible with the official ``vae_ch160v4096z32.pth``: module names, registration order and
shapes follow the published layout, so ``VQVAE.state_dict()`` has exactly the official keys in the
official order. Images are in [-1, 1]; latents are ``[B, Cvae, h, w]`` with ``h = image_size / 2**(levels-1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_CH_MULT = (1, 1, 2, 2, 4)
OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
NORM_GROUPS = 32  # GroupNorm groups of the latent-diffusion "vq-f16" family, as in the checkpoints


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


def _in_own_dtype(x_BCHW: torch.Tensor) -> bool:
    """Whether an operation on ``x`` runs in x's dtype, not autocast's choice: without autograd under autocast.
    CUDA autocast runs group norms and upsampling in float32: a bf16 map would be copied to float32, processed
    and written in float32, and copied back to bf16 by the next convolution."""
    return not torch.is_grad_enabled() and torch.is_autocast_enabled(x_BCHW.device.type)


def _normed(norm: nn.GroupNorm, x_BCHW: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` [B, C, H, W]; in x's dtype where ``_in_own_dtype``, the affine parameters cast to it (both
    devices' kernels take one dtype). The statistics are accumulated in float32 either way, so a bf16 x's result
    differs from float32's by its rounding; a norm followed by SiLU moves 8 bytes per bf16 entry instead of
    CUDA autocast's 28 (the copy, the float32 norm and SiLU, the cast back)."""
    if not _in_own_dtype(x_BCHW):
        return norm(x_BCHW)
    weight, bias = norm.weight.to(x_BCHW.dtype), norm.bias.to(x_BCHW.dtype)
    with torch.autocast(x_BCHW.device.type, enabled=False):
        return F.group_norm(x_BCHW, norm.num_groups, weight, bias, norm.eps)


def _norm_silu(norm: nn.GroupNorm, x_BCHW: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))`` [B, C, H, W]: without autograd nothing keeps the norm's output, so SiLU overwrites it
    instead of allocating (and on CPU page-faulting) another map."""
    return F.silu(_normed(norm, x_BCHW), inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice with a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # One expression: conv1's output is referenced by nothing once norm2 has read it, so without autograd the
        # block holds at most three maps (x, a norm's output, a convolution's) where two statements held four.
        h_BCHW = self.conv2(_norm_silu(self.norm2, self.conv1(_norm_silu(self.norm1, x_BCHW))))
        if not torch.is_grad_enabled():  # nothing keeps h: the residual add overwrites it
            return h_BCHW.add_(self.nin_shortcut(x_BCHW))
        return self.nin_shortcut(x_BCHW) + h_BCHW


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1-conv qkv projection and scale C^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        q_BCN, k_BCN, v_BCN = self.qkv(_normed(self.norm, x_BCHW)).reshape(B, 3, C, H * W).unbind(1)
        attn_BNN = torch.bmm(q_BCN.transpose(1, 2), k_BCN).mul_(C**-0.5).softmax(dim=2)
        h_BCN = torch.bmm(v_BCN, attn_BNN.transpose(1, 2))
        return x_BCHW + self.proj_out(h_BCN.reshape(B, C, H, W))


class Downsample2x(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3x3 conv, as in the checkpoints."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(_upsampled(x_BCHW))


def _upsampled(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling [B, C, 2H, 2W]; in x's dtype where ``_in_own_dtype`` (it copies entries: the same
    bits in any dtype, where CUDA autocast's float32 wrote four float32 entries per entry for the next
    convolution to cast back)."""
    if not _in_own_dtype(x_BCHW):
        return F.interpolate(x_BCHW, scale_factor=2, mode="nearest")
    with torch.autocast(x_BCHW.device.type, enabled=False):
        return F.interpolate(x_BCHW, scale_factor=2, mode="nearest")


def _level(blocks: nn.ModuleList, attns: nn.ModuleList, resample: nn.Module | None) -> nn.Module:
    # A bare container keeps the official key names (down.i.block.j, down.i.attn.j, down.i.downsample).
    level = nn.Module()
    level.block, level.attn = blocks, attns
    if resample is not None:
        setattr(level, "downsample" if isinstance(resample, Downsample2x) else "upsample", resample)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


def _level_modules(level: nn.Module) -> list[nn.Module]:
    """A level's modules in the order they run: each block (then its attention, where the level has one), then
    the level's down- or upsampling. The encoder and decoder call them in their own loop: a helper that ran the
    level would hold the level's input map in the caller's frame until it returned (one more full-size map at
    the peak of an encode or decode without autograd)."""
    modules = []
    for i, block in enumerate(level.block):
        modules += [block, level.attn[i]] if len(level.attn) else [block]
    for resample in ("downsample", "upsample"):
        if hasattr(level, resample):
            modules.append(getattr(level, resample))
    return modules


class Encoder(nn.Module):
    """Image [B,3,H,W] -> latent [B,z_channels,H/2^(n-1),W/2^(n-1)], n = len(ch_mult)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels_in, last = ch, len(ch_mult) - 1
        for i_level, mult in enumerate(ch_mult):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(channels_in, ch * mult))
                channels_in = ch * mult
                if i_level == last:
                    attns.append(AttnBlock(channels_in))
            self.down.append(_level(blocks, attns, Downsample2x(channels_in) if i_level != last else None))
        self.mid = _middle(channels_in)
        self.norm_out = _group_norm(channels_in)
        self.conv_out = nn.Conv2d(channels_in, z_channels, 3, padding=1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.conv_in(img_B3HW)
        for level in self.down:
            for module in _level_modules(level):
                h_BCHW = module(h_BCHW)
        h_BCHW = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h_BCHW)))
        return self.conv_out(_norm_silu(self.norm_out, h_BCHW))


class Decoder(nn.Module):
    """Latent [B,z_channels,h,w] -> image [B,3,h*2^(n-1),w*2^(n-1)] (not clamped)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        channels_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, channels_in, 3, padding=1)
        self.mid = _middle(channels_in)
        levels, last = [], len(ch_mult) - 1
        for i_level in reversed(range(len(ch_mult))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(channels_in, ch * ch_mult[i_level]))
                channels_in = ch * ch_mult[i_level]
                if i_level == last:
                    attns.append(AttnBlock(channels_in))
            levels.insert(0, _level(blocks, attns, Upsample2x(channels_in) if i_level != 0 else None))
        # Stored finest-first (up.0 is the full-resolution level) but run coarsest-first, as in the checkpoints.
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels_in)
        self.conv_out = nn.Conv2d(channels_in, 3, 3, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BCHW))))
        for level in reversed(self.up):
            for module in _level_modules(level):
                h_BCHW = module(h_BCHW)
        return self.conv_out(_norm_silu(self.norm_out, h_BCHW))


class Phi(nn.Conv2d):
    """Residual refinement ``phi(h) = (1-r)*h + r*conv3x3(h)`` with r = 0.5 (a Conv2d so keys stay ``.weight``)."""

    def __init__(self, channels: int, resi_ratio: float = 0.5):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = resi_ratio

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace's exact float arithmetic (i*step + start, last = stop). Some scales lie exactly halfway
    between two ticks (e.g. scale 2 of 10), so the rounding decides which phi they use and must match."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [i * step + start for i in range(num - 1)] + [stop]


class SharedPhis(nn.Module):
    """K phi convolutions shared by all scales; scale si uses the phi whose tick is nearest si/(S-1)."""

    def __init__(self, channels: int, num_shared: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels) for _ in range(num_shared))
        # The official tokenizer's rule: ticks inset by 1/(3K) for its K = 4, by 1/(2K) for any other K.
        inset = 1 / 3 / num_shared if num_shared == 4 else 1 / 2 / num_shared
        self.ticks = _linspace(inset, 1 - inset, num_shared)

    def index_for(self, si: int, num_scales: int) -> int:
        at = si / (num_scales - 1)
        distances = [abs(tick - at) for tick in self.ticks]
        return distances.index(min(distances))

    def forward(self, h_BChw: torch.Tensor, *, si: int, num_scales: int) -> torch.Tensor:
        return self.qresi_ls[self.index_for(si, num_scales)](h_BChw)


class MultiScaleQuantizer(nn.Module):
    """Residual quantiser over ``patch_nums`` scales with one codebook [V, Cvae] shared by all scales."""

    def __init__(
        self,
        *,
        vocab_size: int,
        z_channels: int,
        patch_nums: Sequence[int],
        share_quant_resi: int,
        beta: float = 0.25,
    ):
        super().__init__()
        self.vocab_size, self.z_channels, self.beta = vocab_size, z_channels, beta
        self.patch_nums = tuple(patch_nums)
        # Per-scale EMA of code hits (statistics only, kept for checkpoint compatibility and dead-code restarts).
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.quant_resi = SharedPhis(z_channels, share_quant_resi)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.hit_updates = 0

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, h_BChw: torch.Tensor, si: int) -> torch.Tensor:
        return self.quant_resi(h_BChw, si=si, num_scales=self.num_scales)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index [N] of the L2-nearest code; |z|^2 + |e|^2 - 2 z.e in float32 (the latent's precision) whatever the
        module's dtype, the same float path as the checkpoints."""
        codebook_VC = self.embedding.weight.detach().float()
        d_NV = z_NC.square().sum(dim=1, keepdim=True) + codebook_VC.square().sum(dim=1)
        return d_NV.addmm_(z_NC, codebook_VC.T, alpha=-2, beta=1).argmin(dim=1)

    def _residual_at_scale(self, r_BChw: torch.Tensor, si: int) -> torch.Tensor:
        pn = self.patch_nums[si]
        if si == self.num_scales - 1:
            return r_BChw
        return F.interpolate(r_BChw, size=(pn, pn), mode="area")

    def _codes_to_full(self, idx_Bl: torch.Tensor, si: int, full: int) -> torch.Tensor:
        """Code vectors of one scale, bicubic-upsampled to the full latent size (none at the last scale), then phi."""
        pn, B = self.patch_nums[si], idx_Bl.shape[0]
        h_BChw = self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.z_channels, pn, pn)
        if si != self.num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(full, full), mode="bicubic")
        return self.phi(h_BChw, si)

    def _check_latent(self, f_BChw: torch.Tensor) -> None:
        full = self.patch_nums[-1]
        if f_BChw.ndim != 4 or f_BChw.shape[1] != self.z_channels or f_BChw.shape[2:] != (full, full):
            raise ValueError(
                f"latent must be [B, {self.z_channels}, {full}, {full}] for patch_nums {self.patch_nums}, got {list(f_BChw.shape)}"
            )

    @torch.no_grad()
    def f_to_idxBl(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Latent [B,Cvae,h,w] -> token indices, one LongTensor [B, pn*pn] per scale, coarse to fine."""
        self._check_latent(f_BChw)
        B, C, full, _ = f_BChw.shape
        r_BChw, idx_per_scale = f_BChw.float().clone(), []
        for si in range(self.num_scales):
            z_NC = self._residual_at_scale(r_BChw, si).permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bl = self.nearest_code(z_NC).reshape(B, -1)
            r_BChw.sub_(self._codes_to_full(idx_Bl, si, full))
            idx_per_scale.append(idx_Bl)
        return idx_per_scale

    def idxBl_to_fhat(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token indices of all scales -> accumulated latent f_hat [B, Cvae, h, w]."""
        full = self.patch_nums[-1]
        f_hat_BChw = sum(self._codes_to_full(idx, si, full) for si, idx in enumerate(idx_Bl))
        return f_hat_BChw

    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input [B, L - first_l, Cvae]: f_hat after each scale (but the last), area-downsampled
        to the next scale and flattened row-major."""
        if len(idx_Bl) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} index maps (one per scale), got {len(idx_Bl)}")
        B, full = idx_Bl[0].shape[0], self.patch_nums[-1]
        f_hat_BChw = idx_Bl[0].new_zeros(B, self.z_channels, full, full, dtype=self.embedding.weight.dtype)
        next_inputs = []
        for si in range(self.num_scales - 1):
            f_hat_BChw = f_hat_BChw + self._codes_to_full(idx_Bl[si], si, full)
            pn_next = self.patch_nums[si + 1]
            next_inputs.append(
                F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area").flatten(2).transpose(1, 2)
            )
        return torch.cat(next_inputs, dim=1)

    def next_autoregressive_input(
        self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling: add scale si's code map h [B,Cvae,pn,pn] to f_hat; return (f_hat, next scale's input map)."""
        full = self.patch_nums[-1]
        if si != self.num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(full, full), mode="bicubic")
        f_hat_BChw = f_hat_BChw + self.phi(h_BChw, si)
        if si == self.num_scales - 1:
            return f_hat_BChw, f_hat_BChw
        pn_next = self.patch_nums[si + 1]
        return f_hat_BChw, F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area")

    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training quantisation. Returns (f_hat with straight-through gradient [B,Cvae,h,w],
        vq loss = mean over scales of codebook MSE + beta * commitment MSE, code hits [S, V])."""
        self._check_latent(f_BChw)
        f_BChw = f_BChw.float()
        B, C, full, _ = f_BChw.shape
        f_detached = f_BChw.detach()
        r_BChw, f_hat_BChw = f_detached.clone(), torch.zeros_like(f_detached)
        vq_loss, hits_SV = f_BChw.new_zeros(()), f_BChw.new_zeros(self.num_scales, self.vocab_size)
        for si in range(self.num_scales):
            z_NC = self._residual_at_scale(r_BChw, si).permute(0, 2, 3, 1).reshape(-1, C)
            idx_N = self.nearest_code(z_NC)
            hits_SV[si] = idx_N.bincount(minlength=self.vocab_size).float()
            h_BChw = self._codes_to_full(idx_N.reshape(B, -1), si, full)
            f_hat_BChw = f_hat_BChw + h_BChw
            r_BChw = r_BChw - h_BChw.detach()
            # Codebook and phi learn from the first term; the encoder is pulled towards codes by the second.
            vq_loss = (
                vq_loss
                + F.mse_loss(f_hat_BChw, f_detached)
                + self.beta * F.mse_loss(f_hat_BChw.detach(), f_BChw)
            )
        if self.training:
            self._record_hits(hits_SV)
        # Straight-through: the decoder's gradient reaches the encoder; codebook and phi learn from vq_loss only.
        f_hat_st_BChw = f_BChw + (f_hat_BChw - f_BChw).detach()
        return f_hat_st_BChw, vq_loss / self.num_scales, hits_SV

    @torch.no_grad()
    def _record_hits(self, hits_SV: torch.Tensor) -> None:
        momentum = 0.0 if self.hit_updates == 0 else (0.9 if self.hit_updates < 100 else 0.99)
        self.ema_vocab_hit_SV.mul_(momentum).add_(hits_SV, alpha=1 - momentum)
        self.hit_updates += 1


class VQVAE(nn.Module):
    """Encoder + multi-scale quantiser + decoder. Images in [-1, 1], size ``patch_nums[-1] * downsample``."""

    def __init__(
        self,
        *,
        vocab_size: int,
        z_channels: int,
        ch: int,
        patch_nums: Sequence[int],
        share_quant_resi: int = 4,
        ch_mult: Sequence[int] = OFFICIAL_CH_MULT,
        num_res_blocks: int = 2,
    ):
        super().__init__()
        self.vocab_size, self.z_channels, self.patch_nums = vocab_size, z_channels, tuple(patch_nums)
        self.architecture = dict(
            vocab_size=vocab_size,
            z_channels=z_channels,
            ch=ch,
            patch_nums=self.patch_nums,
            share_quant_resi=share_quant_resi,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
        )
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.image_size = self.patch_nums[-1] * self.downsample
        layout = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels)
        self.encoder = Encoder(**layout)
        self.decoder = Decoder(**layout)
        self.quantize = MultiScaleQuantizer(
            vocab_size=vocab_size,
            z_channels=z_channels,
            patch_nums=patch_nums,
            share_quant_resi=share_quant_resi,
        )
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)

    def _check_image(self, img_B3HW: torch.Tensor) -> None:
        if (
            img_B3HW.ndim != 4
            or img_B3HW.shape[1] != 3
            or img_B3HW.shape[2:] != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"images must be [B, 3, {self.image_size}, {self.image_size}] in [-1, 1], got {list(img_B3HW.shape)}"
            )

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> continuous latent [B,Cvae,h,w] (before quantisation)."""
        self._check_image(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def img_to_idxBl(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images [B,3,H,W] in [-1,1] -> token indices, one LongTensor [B, pn*pn] per scale."""
        return self.quantize.f_to_idxBl(self.img_to_f(img_B3HW))

    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.quantize.idxBl_to_var_input(idx_Bl)

    def fhat_to_img(self, f_hat_BChw: torch.Tensor, *, channels_last: bool | None = None) -> torch.Tensor:
        """Latent [B,Cvae,h,w] -> images [B,3,H,W] clamped to [-1, 1] (contiguous).

        ``channels_last`` (None: on CPU only): the latent, and so the decoder's maps, in NHWC. oneDNN's convolutions
        take NHWC without reordering every activation (the same numbers up to float rounding, ~3e-5 on the official
        size). On CUDA, cuDNN runs a convolution NHWC only while its input or weight is, and GroupNorm's kernel may
        give NCHW: an NHWC decode there also wants the weights in channels-last (``vqvae.to(memory_format=...)``);
        ``scripts/benchmark_gpu.py`` measures the two layouts side by side."""
        if channels_last is None:
            channels_last = f_hat_BChw.device.type == "cpu"
        if channels_last:
            f_hat_BChw = f_hat_BChw.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1).contiguous()

    def idxBl_to_img(
        self, idx_Bl: Sequence[torch.Tensor], *, last_one: bool = True
    ) -> torch.Tensor | list[torch.Tensor]:
        """Token indices -> images in [-1, 1]; with ``last_one=False`` one image per prefix of scales."""
        if last_one:
            return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_Bl))
        return [self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_Bl[: si + 1])) for si in range(len(idx_Bl))]

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction [B,3,H,W] unclamped, vq loss scalar, code hits [S, V])."""
        f_hat_BChw, vq_loss, hits_SV = self.quantize(self.img_to_f(img_B3HW))
        return self.decoder(self.post_quant_conv(f_hat_BChw)), vq_loss, hits_SV


def validate_vqvae_layout(
    *,
    vocab_size: int,
    z_channels: int,
    ch: int,
    patch_nums: Sequence[int],
    share_quant_resi: int,
    ch_mult: Sequence[int],
) -> None:
    """Raise ValueError naming the bad argument; called before any allocation."""
    if (
        len(patch_nums) < 2
        or any(int(p) != p or p < 1 for p in patch_nums)
        or list(patch_nums) != sorted(set(patch_nums))
    ):
        raise ValueError(
            f"patch_nums must be >= 2 strictly increasing positive ints, got {tuple(patch_nums)}"
        )
    if vocab_size < 2 or z_channels < 1:
        raise ValueError(f"vocab_size must be >= 2 and z_channels >= 1, got {vocab_size}, {z_channels}")
    if ch < NORM_GROUPS or any((ch * m) % NORM_GROUPS for m in ch_mult):
        raise ValueError(
            f"ch * each ch_mult must be a multiple of {NORM_GROUPS} (GroupNorm groups), got ch={ch}, ch_mult={tuple(ch_mult)}"
        )
    if share_quant_resi < 1:
        raise ValueError(
            f"share_quant_resi must be >= 1 (number of shared phi convolutions), got {share_quant_resi}"
        )
    if not ch_mult:
        raise ValueError("ch_mult must name at least one level")


def build_vqvae(
    *,
    vocab_size: int,
    z_channels: int,
    ch: int,
    patch_nums: Sequence[int],
    share_quant_resi: int = 4,
    ch_mult: Sequence[int] = OFFICIAL_CH_MULT,
    num_res_blocks: int = 2,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VQVAE:
    """Build a VQVAE; ``device="meta"`` allocates nothing (shape checks). The official tokenizer is
    ``build_vqvae(vocab_size=4096, z_channels=32, ch=160, patch_nums=(1,2,3,4,5,6,8,10,13,16))``."""
    validate_vqvae_layout(
        vocab_size=vocab_size,
        z_channels=z_channels,
        ch=ch,
        patch_nums=patch_nums,
        share_quant_resi=share_quant_resi,
        ch_mult=ch_mult,
    )
    with torch.device(device or "cpu"):
        vqvae = VQVAE(
            vocab_size=vocab_size,
            z_channels=z_channels,
            ch=ch,
            patch_nums=patch_nums,
            share_quant_resi=share_quant_resi,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
        )
    if str(device) != "meta":
        # Codebook small and centred so early training lets the encoder, not the init, set the code scale.
        nn.init.uniform_(vqvae.quantize.embedding.weight, -1 / vocab_size, 1 / vocab_size)
    return vqvae.to(dtype=dtype) if dtype is not None else vqvae


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["VQVAE", "MultiScaleQuantizer", "build_vqvae", "count_parameters"]
