"""Dry-run estimates of a sweep: steps, training rows, images evaluated and GPU hours per trial, from the official
VAR and VQVAE geometry and the training and sampling rates measured on one GPU (``measured_throughput.json``,
written by ``scripts/benchmark_gpu.py``): the trial's own setting's, else the nearest measured setting's (another
depth, k or method; another evaluation batch size or compile setting) scaled by the FLOPs, else an assumed
utilisation; the output says per trial which. Standard library only.

The FLOP model is the one ``trainables.profiling``'s counter applies to a real step: 2 FLOPs per multiply-add of
every matrix product. Per token: the blocks' attention (qkv, projection) and MLP weights and the output head; per
image: the AdaLN modulation (each block's and the head's, computed once per image from the class embedding);
attention's two L x L products per block over the query/key pairs the block-causal mask lets through (62% of the
dense L x L at 680 tokens; ``visible_attention_fraction``), the useful work whichever kernel computes it.
Norms, softmax, element-wise ops, the optimiser, the adapters' own small products (rank-16 LoRA: 2.7% at d16 by
the counter) and the evaluation's Inception features (``FEATURES_NOTE``) are not counted. Sampling counts the same products for both classifier-free guidance rows (the word embedding once:
the rows share their input) and the VQVAE's decoding (convolutions and its attention's two products), as
``trainables.evaluation.evaluate`` counts a trial's ``sample_flops_per_image`` (a LoRA model's with its adapter
merged, as CUDA's bf16 sampling runs it; unmerged, the record counts the adapter's products too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schema import DATASETS, TrialConfig

VAR_PARAMETERS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}  # REFERENCE.md §1
OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TOKENS_PER_IMAGE = sum(n * n for n in OFFICIAL_PATCH_NUMS)  # 680
# Dense bf16 tensor-core peaks (vendor datasheets, FLOP/s), for MFU and the dry run's assumed rates; matched as
# substrings of a device name, the longest key first (``gpu_kind``): an "H200 NVL", "H100 NVL" or "H100 PCIe" is not
# the SXM part (835, 835 and 756 TFLOP/s), nor an "L40" an "L4".
PEAK_FLOPS = {
    "H200 NVL": 835e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 125e12,
    "L4": 121e12,
}
# The kinds as ``gpu_kind`` tries them: the longest name first, so an "H200 NVL" is not taken for an "H200".
GPU_KINDS = tuple(sorted(PEAK_FLOPS, key=len, reverse=True))
ASSUMED_UTILISATION = 0.35
# Attention's backward as a multiple of its forward (five L x L products for two), as the counter counts it: a
# flash kernel recomputes the scores QK^T. Model FLOPs, MFU's numerator, leave that recomputation out (four).
ATTENTION_BACKWARD = 2.5
USEFUL_ATTENTION_BACKWARD = 2.0


@dataclass(frozen=True)
class VarShape:
    """The matrix-product geometry of a VAR: depth, width C (64 x depth for the official family), codebook size,
    VQVAE latent channels, token-map sides per scale. One AdaLN modulation per block, as the official models have
    it (``shared_aln=False``)."""

    depth: int
    embed_dim: int
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS

    @classmethod
    def official(cls, depth: int) -> VarShape:
        return cls(depth=depth, embed_dim=64 * depth)

    @property
    def tokens(self) -> int:
        """L, tokens per image (680 for the official scales)."""
        return sum(n * n for n in self.patch_nums)

    @property
    def per_token_weights(self) -> int:
        """Weights applied to every token: per block qkv (3C^2), projection (C^2), MLP (8C^2); the head (C x V)."""
        c = self.embed_dim
        return self.depth * 12 * c * c + c * self.vocab_size

    @property
    def per_image_weights(self) -> int:
        """The AdaLN modulation, applied once per image: 6C^2 per block and 2C^2 before the head."""
        c = self.embed_dim
        return self.depth * 6 * c * c + 2 * c * c

    @property
    def word_embedding_flops(self) -> int:
        """Forward FLOPs of the word embedding (latent channels -> C) on the tokens after the first scale."""
        return 2 * self.z_channels * self.embed_dim * (self.tokens - self.patch_nums[0] ** 2)

    @property
    def attention_flops(self) -> int:
        """Forward FLOPs of attention's two L x L products in every block, dense (masked pairs included)."""
        return self.depth * 4 * self.tokens**2 * self.embed_dim


def visible_attention_fraction(patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS) -> float:
    """Share of the L x L query-key pairs VAR's block-causal mask lets through (a token sees its own and earlier
    scales): 286,434 of 462,400 = 0.619 for the official scales, so 38% of the dense count is masked."""
    sizes = [n * n for n in patch_nums]
    seen = sum(size * sum(sizes[: i + 1]) for i, size in enumerate(sizes))
    return seen / sum(sizes) ** 2


def training_flops_per_row(
    shape: VarShape,
    method: str,
    *,
    dense_attention: bool = False,
    trained_blocks: int | None = None,
    attention_backward: float = ATTENTION_BACKWARD,
) -> float:
    """Useful training FLOPs of one row (one image view): forward, then backward. Full fine-tuning computes weight
    and input gradients (2x the forward); adapters only input gradients (1x; the word embedding, whose input
    needs no gradient, none). Full fine-tuning of ``trained_blocks`` blocks only (``method.train_blocks``; None:
    every block, the head and the word embedding) computes weight gradients for those blocks alone, but input
    gradients through every block still: the class embedding, always trained, feeds each block's AdaLN and the
    first scale. Attention counts the query/key pairs the mask lets through; ``dense_attention=True`` counts all
    L x L pairs (what a kernel that computes the masked pairs too does). ``attention_backward``: attention's
    backward as a multiple of its forward (``USEFUL_ATTENTION_BACKWARD`` for model FLOPs)."""
    if method == "base":
        return 0.0
    linear = 2 * (shape.per_token_weights * shape.tokens + shape.per_image_weights)
    attention = shape.attention_flops * (
        1.0 if dense_attention else visible_attention_fraction(shape.patch_nums)
    )
    embedding = shape.word_embedding_flops
    if method != "full":
        weight_gradients = 0
    elif trained_blocks is None:
        weight_gradients, embedding = linear, 2 * embedding
    else:  # a block's per-token (12 C^2) and AdaLN (6 C^2, once per image) weights, as in ``VarShape``
        c = shape.embed_dim
        weight_gradients = 2 * trained_blocks * (12 * c * c * shape.tokens + 6 * c * c)
    return 2 * linear + weight_gradients + embedding + (1 + attention_backward) * attention


def trained_blocks(config: TrialConfig) -> int | None:
    """How many blocks ``config`` restricts training to (``method.train_blocks``), or None for all."""
    blocks = config.method.train_blocks
    return None if blocks is None else len(blocks)


def dense_attention_overhead(method: str, *, depth: int = 16) -> float:
    """How much a training total with attention counted dense would exceed the useful one, which counts only the
    visible pairs (0.045 = 4.5%), for the official VAR of ``depth``."""
    shape = VarShape.official(depth)
    return (
        training_flops_per_row(shape, method, dense_attention=True) / training_flops_per_row(shape, method)
        - 1
    )


@dataclass(frozen=True)
class DecoderShape:
    """The multi-scale VQVAE's decoding geometry (REFERENCE.md §1; the official ``vae_ch160v4096z32``): base width
    ``ch``, width multipliers per level (finest first), residual blocks per level (the decoder runs one more),
    latent channels, and the token-map sides per scale (the last is the latent's)."""

    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS


def _conv_flops(kernel: int, channels_in: int, channels_out: int, *, side: int) -> int:
    """A ``kernel`` x ``kernel`` convolution, stride 1, on a ``side`` x ``side`` map."""
    return 2 * kernel * kernel * channels_in * channels_out * side * side


def _resnet_flops(channels_in: int, channels_out: int, *, side: int) -> int:
    """Two 3x3 convolutions, and a 1x1 shortcut where the width changes (``ResnetBlock``)."""
    shortcut = _conv_flops(1, channels_in, channels_out, side=side) if channels_in != channels_out else 0
    return (
        _conv_flops(3, channels_in, channels_out, side=side)
        + _conv_flops(3, channels_out, channels_out, side=side)
        + shortcut
    )


def _attention_block_flops(channels: int, *, side: int) -> int:
    """The 1x1 qkv and output projections and attention's two N x N products over N = side^2 positions."""
    positions = side * side
    return (
        _conv_flops(1, channels, 3 * channels, side=side)
        + _conv_flops(1, channels, channels, side=side)
        + 4 * positions * positions * channels
    )


def decoding_flops(vq: DecoderShape) -> int:
    """Forward FLOPs of turning one image's sampled codes into pixels: the quantiser's phi convolution at every
    scale (summing the latent f-hat), the post-quantisation convolution and the decoder (coarsest level first,
    each upsampling 2x then convolving). Useful work only: nearest upsampling and norms are not products."""
    side, top = vq.patch_nums[-1], vq.ch * vq.ch_mult[-1]
    flops = (len(vq.patch_nums) + 1) * _conv_flops(3, vq.z_channels, vq.z_channels, side=side)
    flops += _conv_flops(3, vq.z_channels, top, side=side)
    flops += 2 * _resnet_flops(top, top, side=side) + _attention_block_flops(top, side=side)
    channels, last = top, len(vq.ch_mult) - 1
    for level in reversed(range(len(vq.ch_mult))):
        width = vq.ch * vq.ch_mult[level]
        for _ in range(vq.num_res_blocks + 1):
            flops += _resnet_flops(channels, width, side=side)
            channels = width
            flops += _attention_block_flops(width, side=side) if level == last else 0
        if level != 0:
            side *= 2
            flops += _conv_flops(3, width, width, side=side)
    return flops + _conv_flops(3, channels, 3, side=side)


def sampling_flops_per_image(shape: VarShape, vq: DecoderShape | None = None) -> float:
    """Useful FLOPs of generating one image: the VAR's forward over every scale for both guidance rows (the KV
    cache: each query meets its own and earlier scales' keys, the pairs training's mask lets through), the word
    embedding once, and the decoding (``decoding_flops``; the official VQVAE at ``shape``'s scales unless ``vq``)."""
    vq = vq if vq is not None else DecoderShape(z_channels=shape.z_channels, patch_nums=shape.patch_nums)
    linear = 2 * (shape.per_token_weights * shape.tokens + shape.per_image_weights)
    attention = shape.attention_flops * visible_attention_fraction(shape.patch_nums)
    return 2 * (linear + attention) + shape.word_embedding_flops + decoding_flops(vq)


# Inception-v3's forward on one 299 x 299 image (its products, as the counter counts them): the FID extractor's,
# run on every evaluated image and not counted in a trial's PFLOPs.
INCEPTION_GFLOPS_PER_IMAGE = 11.4
FEATURES_NOTE = (
    f"the evaluation's feature extraction (Inception-v3: {INCEPTION_GFLOPS_PER_IMAGE} GFLOPs an image, about 1% "
    "of a VAR-d16 image's sampling)"
)

ATTENTION_NOTE = (
    "attention counts only the query/key pairs the block-causal mask lets through, in training (masked or "
    "per-scale kernel) and in sampling (KV cache): the mask hides "
    f"{1 - visible_attention_fraction():.0%} of the L x L pairs at 680 tokens, and counting them would put d16 "
    f"training totals {dense_attention_overhead('full'):.1%} (full fine-tuning) to "
    f"{dense_attention_overhead('lora'):.1%} (adapters) higher"
)


def training_rows(config: TrialConfig, *, train_images: int, steps: int) -> float:
    """Rows (image views) a trial trains: steps x batch, or under DP steps x floor(q*N) (expected), times k views."""
    k = 1 if config.privacy is None else config.privacy.augmentation_multiplicity
    per_step = (
        config.privacy.expected_batch(train_images) if config.privacy else config.optimization.batch_size
    )
    return steps * k * per_step


def training_flops(config: TrialConfig, *, train_images: int, steps: int) -> float:
    """Useful model FLOPs of a trial's training (official models only; the tiny base is not estimated): FLOPs per
    row times the rows it trains."""
    if config.model.base != "official":
        return 0.0
    rows = training_rows(config, train_images=train_images, steps=steps)
    per_row = training_flops_per_row(
        VarShape.official(config.model.depth), config.method.name, trained_blocks=trained_blocks(config)
    )
    return per_row * rows


# Measured training throughput (rows per second on one GPU), one entry per measured setting; see
# ``training_rate`` for how an entry is matched to a trial. Refreshed by
# ``python scripts/benchmark_gpu.py --write-throughput bench/measured_throughput.json``.
MEASURED_THROUGHPUT_FILE = Path(__file__).with_name("measured_throughput.json")
# The device the dry run prices GPU hours on unless told another (``--gpu``): the one the committed measurements
# are for.
ESTIMATE_DEVICE = "NVIDIA H200"


def gpu_kind(name: str) -> str | None:
    """The ``PEAK_FLOPS`` key a device name holds in any case ("NVIDIA H100 80GB HBM3" -> "H100", "h100" -> "H100"),
    the longest first; None for a name that holds none (a CPU, an unknown GPU)."""
    return next((key for key in GPU_KINDS if key.upper() in name.upper()), None)


def check_gpu(name: str) -> str:
    """``name`` if the dry run can price hours on it (``gpu_kind`` knows it), else a ``ValueError`` naming the
    kinds it can."""
    if gpu_kind(name) is None:
        raise ValueError(f"unknown GPU {name!r}: the dry run prices one of {', '.join(PEAK_FLOPS)}")
    return name


def assumed_flops_per_second(device: str) -> float:
    """The useful FLOP/s assumed on ``device`` where nothing near was measured: its peak at ASSUMED_UTILISATION."""
    return PEAK_FLOPS[gpu_kind(check_gpu(device))] * ASSUMED_UTILISATION


THROUGHPUT_KEYS = (
    "device",
    "depth",
    "method",
    "clipping",
    "augmentation_multiplicity",
    "precision",
    "rows_per_second",
    "source",
)


def _load_entries(path: Path, *, name: str, keys: tuple[str, ...], rate: str) -> list[dict]:
    """The ``name`` list of a measured-throughput file (none when the file or the list is absent). Each entry must
    hold ``keys``, a positive number under ``rate``, a positive integer depth, a source object and a device whose
    datasheet peak is known (``gpu_kind``: a rate is carried to other settings and GPUs by the peaks); anything
    else is refused with the file and the entry named (a hand-edited file must not stop a sweep with a bare
    traceback, nor price a trial at a rate of zero)."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    entries = data.get(name, []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an object whose {name!r} is a list of entries")
    for entry in entries:
        missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise ValueError(f"{path}: a {name} entry lacks {missing}: {entry}")
        depth = entry["depth"]
        if not (_positive(entry[rate]) and _positive(depth) and isinstance(depth, int)) or not isinstance(
            entry["source"], dict
        ):
            raise ValueError(
                f"{path}: a {name} entry needs a positive {rate}, a positive integer depth and a source object: "
                f"{entry}"
            )
        if not isinstance(entry["device"], str) or gpu_kind(entry["device"]) is None:
            raise ValueError(
                f"{path}: a {name} entry was measured on {entry['device']!r}, a device without a known dense "
                f"bf16 peak (bench.estimates.PEAK_FLOPS knows {', '.join(PEAK_FLOPS)}): add its datasheet peak "
                f"there, or remove the entry: {entry}"
            )
    return entries


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def load_measured_throughput(path: Path = MEASURED_THROUGHPUT_FILE) -> list[dict]:
    """The training entries of a measured-throughput file; each must hold THROUGHPUT_KEYS."""
    return _load_entries(path, name="measurements", keys=THROUGHPUT_KEYS, rate="rows_per_second")


def trial_setting(config: TrialConfig) -> dict:
    """What a measured rate must share with a trial to stand for it: the official depth, the method, the DP
    clipping as the trial resolves it (None without DP; "auto" is book-keeping, which has a rule for every
    layer of an adapted VAR: ``trainables.privacy.resolve_clipping``), k views per example, and the precision
    the trial trains in on a GPU (bf16 autocast unless switched off or under ghost clipping, which trains in
    float32: ``trainables.finetune.training_autocast``)."""
    privacy = config.privacy
    clipping = (
        None if privacy is None else ("bookkeeping" if privacy.clipping == "auto" else privacy.clipping)
    )
    bf16 = config.optimization.autocast_bf16 and clipping != "ghost"
    return {
        "depth": config.model.depth,
        "method": config.method.name,
        "clipping": clipping,
        "augmentation_multiplicity": 1 if privacy is None else privacy.augmentation_multiplicity,
        "precision": "bf16 autocast" if bf16 else "float32",
    }


@dataclass(frozen=True)
class Rate:
    """The rate part of a trial is priced at on one GPU (rows per second of training, images per second of
    sampling), how it was found (``kind``: "measured" for the trial's own setting, "scaled" from the nearest
    measurement of another setting (``_rate``), "assumed" utilisation, "none" where nothing is priced), a label
    for the table, and the measurement it rests on."""

    per_second: float
    kind: str
    basis: str
    measured: dict | None = None


def _same(entry: dict, wanted: dict, *, but: tuple[str, ...] = ()) -> bool:
    return all(_equal(key, entry[key], value) for key, value in wanted.items() if key not in but)


def _equal(key: str, measured: object, wanted: object) -> bool:
    # A device by its kind: the benchmark records the full name ("NVIDIA H100 80GB HBM3"), ``--gpu`` may say "H100".
    return gpu_kind(measured) == gpu_kind(wanted) if key == "device" else measured == wanted


_SETTING_LABELS = {
    "depth": lambda v: f"d{v}",
    "method": str,
    "augmentation_multiplicity": lambda v: f"k={v}",
    "batch_size": lambda v: f"batch {v}",
    "compiled": lambda v: "compiled" if v else "eager",
    "device": gpu_kind,
}
# Another method counts as this many differences unless it trains alike (full fine-tuning's weight gradients, or
# the adapters' and LN tuning's input gradients only): its utilisation says little about the trial's.
UNLIKE_METHOD = 3


def _difference(key: str, measured: object, wanted: object) -> tuple[int, float]:
    """How far a measurement's ``key`` lies from the trial's: (differences counted, distance). Depths by their
    difference; k and batch sizes by their ratio (k = 4 is nearer 32 than k = 1 is)."""
    if _equal(key, measured, wanted):
        return 0, 0.0
    if key == "method":
        return (1 if (measured == "full") == (wanted == "full") else UNLIKE_METHOD), 0.0
    if key == "depth":
        return 1, abs(measured - wanted)
    if key in ("augmentation_multiplicity", "batch_size"):
        return 1, abs(math.log(measured / wanted))
    return 1, 0.0


def _rate(
    entries: list[dict],
    *,
    wanted: dict,
    relax: tuple[str, ...],
    key: str,
    unit: str,
    flops_of: Callable[[dict], float],
    prefer: Callable[[dict], bool],
) -> Rate:
    """The rate of the setting ``wanted`` from measured ``entries`` (their rate under ``key``, in ``unit``/s).
    Measured: an entry of the setting (``prefer`` first, then the latest). Scaled: else the nearest entry free to
    differ in the first of the ``relax`` keys, else in the first two, and so on; nearest by the differences
    counted (``_difference``), then the distance in each freed key in ``relax``'s order, ``prefer``, the latest,
    the slower. Its rate is scaled by the useful FLOPs per row or image of the two settings (``flops_of``) and by
    the two devices' datasheet peaks, so its utilisation carries over. The device is freed last: another kind of
    GPU's measurement (the same precision and DP clipping) prices a setting only where none of the device's own
    is near, and it errs short where the device has less memory bandwidth per FLOP (an H100 beside an H200).
    Assumed: nothing near was measured; the setting's useful FLOPs at the assumed utilisation of the device's
    peak. Keys outside ``relax`` (precision, DP clipping) are never crossed, and the file's order never
    decides."""
    relax = (*relax, "device")
    for loosened in range(len(relax) + 1):
        free = relax[:loosened]
        near = [m for m in entries if _same(m, wanted, but=free)]
        if near:
            break
    else:
        rate = assumed_flops_per_second(wanted["device"]) / flops_of(wanted)
        return Rate(rate, "assumed", f"assumed {ASSUMED_UTILISATION:.0%} MFU: {rate:.1f} {unit}/s")

    def nearness(m: dict) -> tuple:
        differences = [_difference(k, m[k], wanted[k]) for k in free]
        return (
            -sum(count for count, _ in differences),
            tuple(-distance for _, distance in differences),
            prefer(m),
            m["source"].get("date", ""),
            -m[key],  # of two equally near, the slower: the estimate errs long
        )

    m = max(near, key=nearness)
    if not free:
        return Rate(m[key], "measured", f"measured {m[key]:.1f} {unit}/s", m)
    peaks = PEAK_FLOPS[gpu_kind(wanted["device"])] / PEAK_FLOPS[gpu_kind(m["device"])]
    rate = m[key] * flops_of(m) / flops_of(wanted) * peaks
    source = " ".join(_SETTING_LABELS[k](m[k]) for k in reversed(free) if not _equal(k, m[k], wanted[k]))
    return Rate(rate, "scaled", f"from {source}: {rate:.1f} {unit}/s", m)


def training_rate(config: TrialConfig, measurements: list[dict], *, device: str = ESTIMATE_DEVICE) -> Rate:
    """Rows per second of ``config``'s training on ``device`` (``_rate``): measured for its ``trial_setting``,
    else scaled from another depth, k or method (in that order) with the same precision and DP clipping (rows
    count every view, so a rate per row carries over between k); the physical batch is not matched. Among
    several, one measured with the trial's attention kernel and compile setting comes first; another method
    counts as a far difference unless it trains alike (``UNLIKE_METHOD``). Measurements train every block: full
    fine-tuning of fewer (``trained_blocks``) is scaled by the useful FLOPs per row of the two. The tiny base and
    the base method (it trains nothing) are not priced."""
    if config.model.base != "official":
        return Rate(0.0, "none", "not estimated")
    if config.method.name == "base":
        return Rate(0.0, "none", "trains nothing")
    kernel, compiled = config.resources.training_attention_kernel, config.resources.compile
    rate = _rate(
        measurements,
        wanted={"device": device, **trial_setting(config)},
        relax=("depth", "augmentation_multiplicity", "method"),
        key="rows_per_second",
        unit="rows",
        flops_of=lambda s: training_flops_per_row(VarShape.official(s["depth"]), s["method"]),
        prefer=lambda m: m.get("attention_kernel") == kernel and bool(m.get("compile")) == compiled,
    )
    blocks = trained_blocks(config)
    if blocks is None or config.method.name != "full":
        return rate
    shape = VarShape.official(config.model.depth)
    faster = training_flops_per_row(shape, "full") / training_flops_per_row(
        shape, "full", trained_blocks=blocks
    )
    per_second = rate.per_second * faster
    return Rate(
        per_second,
        "scaled" if rate.kind == "measured" else rate.kind,
        f"{rate.basis}; {blocks}/{shape.depth} blocks: {per_second:.1f} rows/s",
        rate.measured,
    )


def measured_rate(
    config: TrialConfig, measurements: list[dict], *, device: str = ESTIMATE_DEVICE
) -> dict | None:
    """The measurement of ``config``'s own training setting on ``device`` (``training_rate``), or None."""
    rate = training_rate(config, measurements, device=device)
    return rate.measured if rate.kind == "measured" else None


def training_gpu_hours(
    config: TrialConfig,
    *,
    train_images: int,
    steps: int,
    measurements: list[dict],
    device: str = ESTIMATE_DEVICE,
) -> tuple[float, Rate]:
    """(GPU hours of a trial's training on ``device``, the rate they rest on): the rows it trains over
    ``training_rate``."""
    rate = training_rate(config, measurements, device=device)
    if rate.kind == "none":
        return 0.0, rate
    return training_rows(config, train_images=train_images, steps=steps) / rate.per_second / 3600, rate


# Measured sampling rates (images per second on one GPU), the file's "sampling" entries; see ``sampling_rate``.
SAMPLING_KEYS = (
    "device",
    "depth",
    "precision",
    "batch_size",
    "compiled",
    "images_per_second",
    "measured_in",
    "source",
)


def load_measured_sampling(path: Path = MEASURED_THROUGHPUT_FILE) -> list[dict]:
    """The sampling entries of a measured-throughput file; each must hold SAMPLING_KEYS. ``measured_in``: "trial
    evaluation" (generation with its PNG files, then Inception-v3 features: what a trial's evaluation costs per
    image) or "generation" (sampling alone)."""
    return _load_entries(path, name="sampling", keys=SAMPLING_KEYS, rate="images_per_second")


def _committed_unless_given(
    measurements: list[dict] | None, samplings: list[dict] | None
) -> tuple[list[dict], list[dict]]:
    """The training and sampling rates given, each read from ``MEASURED_THROUGHPUT_FILE`` where None."""
    return (
        load_measured_throughput() if measurements is None else measurements,
        load_measured_sampling() if samplings is None else samplings,
    )


def sampling_setting(config: TrialConfig) -> dict:
    """What a measured sampling rate must share with a trial's evaluations: the official depth, the precision
    (bf16 autocast unless ``optimization.autocast_bf16`` is off, as ``trainables.trial`` evaluates), the
    evaluation batch size and ``resources.compile_sampling``. The method is not matched (a LoRA model samples
    with its adapter merged: the base model's kernels), nor the guidance and filters."""
    return {
        "depth": config.model.depth,
        "precision": "bf16 autocast" if config.optimization.autocast_bf16 else "float32",
        "batch_size": config.evaluation.batch_size,
        "compiled": config.resources.compile_sampling,
    }


def sampling_rate(config: TrialConfig, samplings: list[dict], *, device: str = ESTIMATE_DEVICE) -> Rate:
    """Images per second of ``config``'s evaluations on ``device`` (``_rate``): measured for its
    ``sampling_setting``, else scaled from another depth, evaluation batch size or compile setting (in that order)
    with the same precision; among several, a whole trial evaluation comes before sampling alone. The tiny base is
    not priced."""
    if config.model.base != "official":
        return Rate(0.0, "none", "not estimated")
    return _rate(
        samplings,
        wanted={"device": device, **sampling_setting(config)},
        relax=("depth", "batch_size", "compiled"),
        key="images_per_second",
        unit="img",
        flops_of=lambda s: sampling_flops_per_image(VarShape.official(s["depth"])),
        prefer=lambda m: m["measured_in"] == "trial evaluation",
    )


def final_evaluation_images(config: TrialConfig, *, evaluation_split: int) -> int:
    """Images a trial's final evaluation generates: ``evaluation.num_images``, else one per image of the
    evaluation split."""
    return config.evaluation.num_images if config.evaluation.num_images is not None else evaluation_split


def evaluated_images(config: TrialConfig, *, evaluation_split: int, steps: int) -> int:
    """Images a trial generates and scores: its final evaluation's plus ``convergence_num_images`` at each point
    of its convergence curve."""
    curve = len(config.convergence_steps(steps)) * config.evaluation.convergence_num_images
    return final_evaluation_images(config, evaluation_split=evaluation_split) + curve


def evaluation_gpu_hours(config: TrialConfig, *, images: int, rate: Rate) -> float:
    """GPU hours of a trial's evaluations: ``images`` at ``rate`` on rank 0 while the trial's other GPUs wait,
    so the wall time times every GPU the trial holds (``held_gpus``)."""
    if rate.kind == "none":
        return 0.0
    return images / rate.per_second / 3600 * held_gpus(config)


def held_gpus(config: TrialConfig) -> float:
    """The GPUs a trial holds (workers x GPUs per worker), one at least: a rate is a whole GPU's."""
    return max(1.0, config.resources.workers * config.resources.gpus_per_worker)


def expected_examples(config: TrialConfig) -> int:
    """The examples a trial trains on by the dataset's published size: its training split plus, under a privacy
    audit, the expected half of the canaries (each is included with probability 1/2; the plan counts the real
    ones)."""
    canaries = config.audit.canaries // 2 if config.audit is not None else 0
    return DATASETS[config.data.dataset].train_images + canaries


@dataclass(frozen=True)
class TrialEstimate:
    """What the dry run expects of one trial: its optimiser steps; its training's useful FLOPs, GPU hours and the
    rate they rest on; the images its final evaluation generates and all it generates (the convergence curve's
    too), the useful FLOPs of one, their GPU hours and rate. FLOPs are 0 for the tiny base, which is not priced."""

    steps: int
    train_flops: float
    training_hours: float
    training_rate: Rate
    final_images: int
    images: int
    sample_flops_per_image: float
    evaluation_hours: float
    sampling_rate: Rate
    gpus: float = 1.0

    @property
    def wall_hours(self) -> float:
        """Hours from start to end on the trial's GPUs (its training split among them, its evaluations on one
        while the others wait)."""
        return (self.training_hours + self.evaluation_hours) / self.gpus


def trial_estimate(
    config: TrialConfig,
    *,
    plan: Any = None,
    measurements: list[dict],
    samplings: list[dict],
    device: str = ESTIMATE_DEVICE,
) -> TrialEstimate:
    """The estimate of ``config`` on ``device`` from its preflight ``plan`` (a ``trainables.plan.TrialPlan``: the
    real split sizes) or, without one, the datasets' published sizes; official models only are priced."""
    examples = plan.examples if plan is not None else expected_examples(config)
    steps = plan.planned_steps if plan is not None else config.planned_steps(examples)
    split = plan.evaluation_images if plan is not None else DATASETS[config.data.dataset].test_images
    hours, training = training_gpu_hours(
        config, train_images=examples, steps=steps, measurements=measurements, device=device
    )
    images = evaluated_images(config, evaluation_split=split, steps=steps)
    sampling = sampling_rate(config, samplings, device=device)
    official = config.model.base == "official"
    return TrialEstimate(
        steps=steps,
        train_flops=training_flops(config, train_images=examples, steps=steps),
        training_hours=hours,
        training_rate=training,
        final_images=final_evaluation_images(config, evaluation_split=split),
        images=images,
        sample_flops_per_image=sampling_flops_per_image(VarShape.official(config.model.depth))
        if official
        else 0.0,
        evaluation_hours=evaluation_gpu_hours(config, images=images, rate=sampling),
        sampling_rate=sampling,
        gpus=held_gpus(config),
    )


def longest_first(
    configs: list[TrialConfig],
    plans: dict,
    *,
    measurements: list[dict] | None = None,
    samplings: list[dict] | None = None,
    device: str = ESTIMATE_DEVICE,
) -> list[TrialConfig]:
    """``configs`` in the order a sweep starts them: the longest first (longest-processing-time-first
    scheduling), so that no long trial starts last and holds the sweep open while the other workers idle. Length
    is an official model's estimated wall time (``TrialEstimate.wall_hours``: training and evaluation at the
    rates of ``MEASURED_THROUGHPUT_FILE`` unless given, on ``device``), then the rows trained (the tiny base is
    not priced); ties keep the sweep's order. ``plans``: {trial_id: TrialPlan} from the preflight (N, steps)."""
    measurements, samplings = _committed_unless_given(measurements, samplings)

    def work(config: TrialConfig) -> tuple[float, float]:
        plan = plans[config.trial_id]
        e = trial_estimate(config, plan=plan, measurements=measurements, samplings=samplings, device=device)
        return e.wall_hours, training_rows(config, train_images=plan.examples, steps=plan.planned_steps)

    return sorted(configs, key=work, reverse=True)


def estimate(
    configs: list[TrialConfig],
    *,
    done: set[str],
    plans: dict,
    measurements: list[dict] | None = None,
    samplings: list[dict] | None = None,
    device: str = ESTIMATE_DEVICE,
) -> str:
    """A table of the sweep: one line per trial with its training and evaluation GPU hours and the rates they
    rest on (measured, scaled from the nearest measured setting, or the assumed utilisation), then totals and the
    sources of the measured rates used, all on ``device`` (a name ``gpu_kind`` knows; its own kind's measurements
    first, ``_rate``). ``measurements`` / ``samplings``: the training and sampling entries of
    ``MEASURED_THROUGHPUT_FILE`` when None."""
    check_gpu(device)
    measurements, samplings = _committed_unless_given(measurements, samplings)
    header = (
        f"{'trial':<44} {'id':<16} {'status':<8} {'workers x GPU':>13} {'training rate':<33} {'steps':>7} "
        f"{'train h':>8}  {'eval images':>11} {'evaluation rate':<33} {'eval h':>7}"
    )
    lines, pending, used, unsized = [header], [], {}, 0
    for c in configs:
        finished = c.trial_id in done
        if c.trial_id not in plans and not DATASETS[c.data.dataset].train_images:
            unsized += not finished  # a folder dataset: its sizes are its files', read by the preflight alone
            lines.append(f"{c.label:<44} {c.trial_id:<16} {'done' if finished else 'pending':<8} {UNSIZED}")
            continue
        e = trial_estimate(
            c, plan=plans.get(c.trial_id), measurements=measurements, samplings=samplings, device=device
        )
        if not finished:
            pending.append((e.training_hours, e.evaluation_hours))
        for m in (e.training_rate.measured, e.sampling_rate.measured):
            if m is not None:
                used[json.dumps(m, sort_keys=True)] = m
        gpus = f"{c.resources.workers} x {c.resources.gpus_per_worker:g}"
        lines.append(
            f"{c.label:<44} {c.trial_id:<16} {'done' if finished else 'pending':<8} {gpus:>13} "
            f"{e.training_rate.basis:<33} {e.steps:>7} {e.training_hours:>8.2f}  {e.images:>11} "
            f"{e.sampling_rate.basis:<33} {e.evaluation_hours:>7.2f}"
        )
    train_total, evaluation_total = (sum(column) for column in zip(*pending)) if pending else (0.0, 0.0)
    lines += [
        f"{len(pending) + unsized} of {len(configs)} trials to run; estimated GPU hours on {_article(device)}: "
        f"training {train_total:.1f} + evaluation {evaluation_total:.1f} = {train_total + evaluation_total:.1f}"
        + (f" for {len(pending)} of them; {unsized} {UNSIZED}" if unsized else ""),
        "  training: the rows a trial trains at the rate measured for its depth, method, DP clipping, k and "
        "precision (any rows per forward); 'from ...': measured at another depth, k or method (in that order; the "
        "same precision and DP clipping), scaled by the useful FLOPs per row, or last on another kind of GPU "
        "(named after 'from'), scaled by the datasheet peaks too; 'assumed': useful FLOPs at "
        f"{assumed_flops_per_second(device) / 1e12:.0f} TFLOP/s per GPU ({ASSUMED_UTILISATION:.0%} of the "
        f"{gpu_kind(device)}'s dense bf16 peak), "
        "where nothing near was measured",
        "  evaluation: the images a trial generates and scores (its final evaluation and each convergence "
        "point) at the sampling rate measured for its depth, precision, evaluation batch size and "
        "compile_sampling (a whole trial evaluation where measured, else sampling alone), or from another depth, "
        "batch size, compile setting or GPU, or assumed, as above by the useful FLOPs per image; times the GPUs the "
        "trial holds (rank 0 evaluates, the others wait)",
        "  not included: the token caches (data.cached_views crops per training image, encoded once per dataset "
        "by the VQVAE, each about a third of a LoRA training row), the real images' reference features (computed "
        "once per dataset and cached) and tiny models",
    ]
    lines += [f"  measured: {_describe(m)}" for m in used.values()]
    return "\n".join(lines)


# A trial of a dataset with no published size (``folder``) when the preflight could not plan it (its data unreadable,
# or its plan refused).
UNSIZED = "not estimated: split sizes are read from the data, and the preflight could not plan this trial"


def _describe(m: dict) -> str:
    source = m["source"]
    where = f"{source.get('script')}, {source.get('date')}, {source.get('docs')}"
    if "images_per_second" in m:  # a sampling entry
        compiled = "compiled" if m["compiled"] else "eager"
        return (
            f"{m['device']} d{m['depth']} sampling at batch {m['batch_size']} {compiled} {m['precision']}: "
            f"{m['images_per_second']:.1f} images/s ({m['measured_in']}; {where})"
        )
    dp = "no DP" if m["clipping"] is None else f"DP {m['clipping']}"
    settings = ", ".join(
        f"{key} {m[key]}"
        for key in ("attention_kernel", "compile", "rows_per_forward", "measured_in")
        if key in m
    )
    return (
        f"{m['device']} d{m['depth']} {m['method']} {dp} k={m['augmentation_multiplicity']} {m['precision']}: "
        f"{m['rows_per_second']:.1f} rows/s ({settings}; {where})"
    )


def _article(device: str) -> str:
    """ "an NVIDIA H200", "an H100", "an A100", "an L4", "a T4": by how the first letter is spoken."""
    return f"{'an' if device[:1].upper() in tuple('AEFHILMNORSX') else 'a'} {device}"
