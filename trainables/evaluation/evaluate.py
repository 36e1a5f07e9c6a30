"""Evaluate a (fine-tuned) VAR on a dataset split: generate per the split's class counts, extract features, compute
FID, precision/recall (k=3) and KID against cached reference statistics of the real split.

Also a standalone command for a saved checkpoint (base + adapter, or a merged checkpoint):

    python -m trainables.evaluation.evaluate --var BASE.pth --depth 16 [--adapter ADAPTER.pt|PEFT_FOLDER] \
        --vqvae VAE.pth --dataset flowers102 --root /data --split test --extractor inception-v3-compat \
        --inception-weights /weights/weights-inception-2015-12-05-6726825d.pth --out runs/eval

Every bad input (a missing or corrupt checkpoint, a --depth/--num-classes that disagrees with the checkpoint's
sidecar, an adapter trained on another base file or architecture, a VQVAE or --resolution that does not fit the
VAR, a bad Inception weights file, a bad dataset folder, a split of more classes than the model, of other classes
than the adapter was trained on, or of fewer than 4 images, an out-of-range option) ends in exit status 2 and one
last line ``error: ...`` before any image is generated: what the sidecars, provenance files and checkpoint headers
tell is checked on meta-device builds (no weights) before any model is loaded, and the files themselves (SHA-256s,
CRC-32s, the extractor's weights) are checked as they are loaded, before the split's images are decoded. The
decoding's outcome is kept in the --cache folder, so a second run over the same files decodes none; unreadable
images stop the command unless --skip-corrupt-images drops them (listed in evaluation.json).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.cli import Parser, number, probe_folder, run_reporting
from bench.errors import VarsweepError
from bench.schema import (
    MAX_SEED,
    MIN_EVALUATION_IMAGES,
    EvaluationConfig,
    OptimizationConfig,
    ResourcesConfig,
)

from ..data.datasets import ImageList, check_images, eval_transform, open_rgb, read_dataset
from ..models import VAR, VQVAE
from ..models.checkpoints import (
    CheckpointError,
    atomic_write,
    check_state_dict,
    checkpoint_sha256,
    file_sha256,
    read_checkpoint_header,
    read_sidecar,
    recorded_class_names,
    sidecar_path,
)
from ..profiling import PETA, count_flops
from ..progress import Log, Progress
from .classifier import DigitsCNN, class_accuracy, predict
from .features import (
    DIGITS_CNN,
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    SUBSTITUTE,
    build_extractor,
    extract_features,
    uint8_batches,
)
from .generate import check_sampling_seed, generate, generation_plan, sampling_record
from .metrics import (
    KID_MAX_SUBSET_SIZE,
    ReferenceKey,
    ReferenceStats,
    fid_from_statistics,
    gaussian_statistics,
    kid,
    kid_subset_size,
    precision_recall,
)


@dataclass(frozen=True)
class ScoringSettings:
    """How generated images are scored beyond the trial config (recorded with every result, with the extractor,
    resolution and image count): k of the precision/recall neighbourhoods, KID's subsets and the largest subset
    size; the size used is ``metrics.kid_subset_size``'s (half the smaller set, at most this) and is the one
    recorded, on every path (a trial's evaluations and the standalone command)."""

    neighborhood: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = KID_MAX_SUBSET_SIZE


class EvaluationError(VarsweepError):
    """A bad input of an evaluation (the standalone command's, or a split the model cannot be scored on); the
    message names the option, file or split and the problem."""


def real_images_uint8(images: ImageList, resolution: int, *, batch_size: int = 64):
    """The split's images, resized and centre-cropped as for evaluation, as uint8 batches [B, 3, R, R]."""
    transform = eval_transform(resolution)
    for start in range(0, len(images), batch_size):
        batch = [
            transform(open_rgb(path)).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            for path in images.paths[start : start + batch_size]
        ]
        yield torch.stack(batch)


def reference_statistics(
    images: ImageList,
    *,
    extractor,
    resolution: int,
    cache: ReferenceStats,
    device: torch.device | str = "cpu",
    weights_id: str | None = None,
) -> tuple[dict, bool]:
    """((mu, sigma, features) of the real split at ``resolution`` pixels, whether they were cached), computed once
    per (dataset, split, resolution, extractor and its weights, images). ``weights_id``: the extractor's weights
    when the caller knows them (``extractor_weights_id``; default: the extractor's own ``weights_id``)."""
    key = ReferenceKey(
        images.name,
        images.split,
        resolution,
        extractor.name,
        len(images),
        images.fingerprint(),
        weights_id or extractor_weights_id(extractor),
    )
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    features = extract_features(extractor, real_images_uint8(images, resolution), device=device)
    return cache.save(key, features), False


def evaluate(
    var: VAR,
    vqvae: VQVAE,
    images: ImageList,
    *,
    evaluation: EvaluationConfig,
    autocast_bf16: bool,
    compiled_sampling: bool = False,
    cache: ReferenceStats,
    scoring: ScoringSettings = ScoringSettings(),
    feature_extractor=None,
    out_dir: str | Path | None = None,
    classifier: tuple[DigitsCNN, dict] | None = None,
    log: Log | None = None,
) -> dict:
    """Metrics of ``var`` against the real split ``images``, at the VQVAE's image size, with ``evaluation``'s
    extractor, image count and sampling settings (``autocast_bf16``: the trial's ``optimization.autocast_bf16``),
    all recorded; ``compiled_sampling``: the trial's ``resources.compile_sampling`` (``generate``'s ``compiled``).
    ``feature_extractor``: the built extractor (default: built from ``evaluation.extractor`` and
    ``evaluation.inception_weights``). ``classifier`` (model, record) adds the class accuracy of the generated
    images (does each show its class?)."""
    check_split_fits(images, num_classes=var.num_classes, model="the VAR")
    # Before the reference statistics: sampling would find either only after them.
    check_models_fit(var, vqvae)
    check_sampling_seed(evaluation.sampling_seed)
    device = next(var.parameters()).device
    resolution = vqvae.image_size
    feature_extractor = (
        feature_extractor
        or build_extractor(
            evaluation.extractor,
            weights_path=evaluation.inception_weights,
            weights_sha256=evaluation.inception_weights_sha256,
        )
    ).to(device)
    started = time.perf_counter()
    reference, hit = reference_statistics(
        images,
        extractor=feature_extractor,
        resolution=resolution,
        cache=cache,
        device=device,
        weights_id=extractor_weights_id(feature_extractor, evaluation=evaluation),
    )
    reference_seconds = time.perf_counter() - started
    plan = generation_plan(list(images.class_counts.values()), total=evaluation.num_images)
    started, tally = time.perf_counter(), {}
    generated, requested_N = generate(
        var,
        vqvae,
        plan,
        evaluation=evaluation,
        autocast_bf16=autocast_bf16,
        compiled=compiled_sampling,
        out_dir=out_dir,
        progress=Progress("evaluation", "generated image", sum(plan), log=log),
        tally=tally,
    )
    generation_seconds = time.perf_counter() - started
    progress = Progress("evaluation", "scoring", 1, log=log)
    features = extract_features(feature_extractor, uint8_batches(generated), device=device)
    real = torch.from_numpy(reference["features"]).double()
    subset_size = kid_subset_size(len(features), len(real), largest=scoring.kid_subset_size)
    metrics = {
        "fid": fid_from_statistics(
            gaussian_statistics(features), {"mu": reference["mu"], "sigma": reference["sigma"]}
        ),
        **precision_recall(features, real, neighborhood=scoring.neighborhood),
        **kid(features, real, subsets=scoring.kid_subsets, subset_size=subset_size),
    }
    recorded = {
        "extractor": feature_extractor.name,
        "resolution": resolution,
        "num_images": evaluation.num_images,
        **asdict(scoring),
        "kid_subset_size": subset_size,  # the size used, not the setting's upper bound
    }
    if classifier is not None:
        model, record = classifier
        metrics.update(class_accuracy(predict(model.to(device), generated), requested_N, classes=len(plan)))
        recorded["classifier"] = {
            key: record[key] for key in ("name", "test_accuracy", "weights_sha256", "input_size")
        }
    progress.update(1, " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    per_image = _sampling_flops_per_image(
        var, vqvae, label=next(i for i, c in enumerate(plan) if c > 0), evaluation=evaluation
    )
    # Useful FLOPs, as training's: the images evaluated, not compiled sampling's padding rows (their transformer
    # work, at most a batch less one per evaluation). The rate is the wall time's, a first compile included, over
    # the images this call drew: those an interrupted earlier run wrote to ``out_dir`` are read back, not drawn, in
    # that time (None when every image was read back: no rate was measured).
    drawn = tally["drawn"]
    compute = {
        "sample_flops_per_image": per_image,
        "sample_pflops": per_image * len(generated) / PETA,
        "images_per_second": drawn / generation_seconds if drawn and generation_seconds else None,
    }
    return {
        "metrics": metrics,
        "evaluation_settings": recorded,
        "compute": compute,
        "sampling": sampling_record(evaluation, autocast_bf16=autocast_bf16, compiled=compiled_sampling),
        "images_generated": len(generated),
        "images_drawn": drawn,  # by this call; the others were read back from out_dir
        "plan": plan,
        "reference_cache_hit": hit,
        "reference_seconds": reference_seconds,
        "generation_seconds": generation_seconds,
    }


def check_split_fits(images: ImageList, *, num_classes: int, model: str) -> None:
    """Refuse a split the model cannot be scored on, before anything is generated: more classes than the model
    has (label ``num_classes`` is VAR's unconditional class, so the split's class ``num_classes`` would be drawn
    unconditionally, silently) or fewer images than precision/recall can score (``MIN_EVALUATION_IMAGES``)."""
    classes = len(images.class_names)
    if classes > num_classes:
        raise EvaluationError(
            f"{images.name} {images.split}: the split has {classes} classes but {model} has {num_classes} (label "
            f"{num_classes} is its unconditional class): evaluate on the split it was trained for"
        )
    if len(images) < MIN_EVALUATION_IMAGES:
        raise EvaluationError(
            f"{images.name} {images.split}: {len(images)} image(s), fewer than the {MIN_EVALUATION_IMAGES} "
            "that precision/recall (k=3) needs: use a larger split"
        )


def check_split_classes(
    images: ImageList, *, class_names: Sequence[str] | None, num_classes: int, model: str
) -> None:
    """Refuse a split whose classes are not the ones ``model`` was trained on (``class_names``, label i first at i):
    each split numbers its own classes (a folder split without one class's folder shifts every later label), so
    label i would be drawn for one class and scored against another, silently. For a model that records no class
    names (adapters saved before they were recorded), only the count can be compared."""
    split = list(images.class_names)
    if class_names is None:
        if len(split) != num_classes:
            raise EvaluationError(
                f"{images.name} {images.split}: the split has {len(split)} classes but {model} has {num_classes} "
                "and records no class names (saved before they were recorded), so a split of another count "
                "cannot be matched to its labels: evaluate on the split of the classes it was trained on"
            )
        return
    if split != list(class_names):
        raise EvaluationError(
            f"{images.name} {images.split}: the split's classes are not the {len(class_names)} {model} was "
            f"trained on ({_class_differences(list(class_names), split)}), so its labels would name other "
            "classes: evaluate on a split of the training classes"
        )


def _class_differences(trained: list[str], split: list[str]) -> str:
    """The first differences between the training and the split's class names, for an error message."""

    def first(names: list[str]) -> str:
        return ", ".join(map(repr, names[:5])) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    missing = [name for name in trained if name not in set(split)]
    extra = [name for name in split if name not in set(trained)]
    parts = [
        f"{what}: {first(names)}"
        for what, names in (("missing from the split", missing), ("not trained on", extra))
        if names
    ]
    if parts:
        return "; ".join(parts)
    label = next(i for i, (a, b) in enumerate(zip(trained, split)) if a != b)
    return f"the same names in another order: label {label} is {trained[label]!r} in training, {split[label]!r} here"


def check_models_fit(var: VAR, vqvae: VQVAE, *, names: tuple[str, str] = ("the VAR", "the VQVAE")) -> None:
    """Refuse a VQVAE whose tokens are not the VAR's (vocabulary, latent channels, scales), before anything is
    computed: sampling finds it only at its first call. Works on meta-device builds. ``names``: (VAR, VQVAE)."""
    differing = [
        f"{field}: VAR {getattr(var, field)!r}, VQVAE {getattr(vqvae, field)!r}"
        for field in ("vocab_size", "z_channels", "patch_nums")
        if getattr(var, field) != getattr(vqvae, field)
    ]
    if differing:
        raise EvaluationError(
            f"{names[1]} does not match {names[0]} ({'; '.join(differing)}): the VAR draws tokens of the VQVAE it "
            "was trained with; pass that one"
        )


def extractor_weights_id(extractor, *, evaluation: EvaluationConfig | None = None) -> str:
    """Which weights ``extractor`` runs (``ReferenceKey.weights``). Inception loaded from ``evaluation``'s own
    file with a known ``inception_weights_sha256`` (a trial's: the driver hashed the file and the trial checked it
    before loading, ``trainables.assets.verify_content``) takes that value; any other extractor its
    ``weights_id`` (Inception: the file hashed once; the digit classifier: its record's ``weights_sha256``)."""
    e = evaluation
    if (
        e is not None
        and e.inception_weights_sha256
        and extractor.name == INCEPTION
        and Path(extractor.weights_path) == Path(e.inception_weights)
    ):
        return e.inception_weights_sha256
    weights_id = getattr(extractor, "weights_id", None)
    if not weights_id:
        raise ValueError(
            f"feature extractor {extractor.name!r} does not say which weights it runs (weights_id), so its "
            "reference statistics cannot be keyed: build it with build_extractor"
        )
    return weights_id


def _sampling_flops_per_image(var: VAR, vqvae: VQVAE, *, label: int, evaluation: EvaluationConfig) -> int:
    """FLOPs of generating one image (both CFG branches, all scales, VQVAE decoding); linear in the batch."""
    device = next(var.parameters()).device
    flops, _ = count_flops(
        lambda: var.sample(
            torch.tensor([label], device=device),
            vqvae=vqvae,
            cfg=evaluation.guidance_scale,
            top_k=evaluation.top_k,
            top_p=evaluation.top_p,
            generator=torch.Generator(device=device).manual_seed(0),
        )
    )
    return flops


def _parser() -> Parser:
    parser = Parser(
        prog="python -m trainables.evaluation.evaluate",
        description="Evaluate a saved VAR checkpoint (FID, precision/recall, KID).",
    )
    parser.add_argument("--var", required=True, help="base (or merged) VAR checkpoint")
    parser.add_argument(
        "--depth",
        type=number(int, minimum=1),
        help="depth of the --var checkpoint (read from its sidecar when it has one; a different value is refused)",
    )
    parser.add_argument(
        "--num-classes",
        type=number(int, minimum=1),
        help="classes of the --var checkpoint (default: its sidecar's, else 1000; a different value is refused)",
    )
    parser.add_argument(
        "--adapter",
        help="adapter applied to --var: an adapter.pt (methods.save_adapter) or a peft adapter folder "
        "(peft_format.save_peft_adapter, a trial's adapter-peft/)",
    )
    parser.add_argument("--vqvae", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="test")
    # The sampling options' defaults are EvaluationConfig's (a sweep trial's), never a copy of their values.
    defaults = EvaluationConfig  # its fields' defaults, read as class attributes
    parser.add_argument(
        "--extractor", default=EvaluationConfig.extractor, choices=(INCEPTION, SUBSTITUTE, DIGITS_CNN)
    )
    parser.add_argument(
        "--inception-weights", help=f"the local {INCEPTION_WEIGHTS_FILE} (for --extractor {INCEPTION})"
    )
    parser.add_argument(
        "--resolution",
        type=number(int, minimum=8),
        help="pixels, checked against the --vqvae model's image size (default: that size)",
    )
    parser.add_argument(
        "--num-images",
        type=number(int, minimum=MIN_EVALUATION_IMAGES),
        default=defaults.num_images,
        help="images to generate (default: as many per class as the split has)",
    )
    parser.add_argument(
        "--guidance-scale",
        "--cfg",
        dest="guidance_scale",
        type=number(float, minimum=0),
        default=defaults.guidance_scale,
        help="classifier-free guidance scale, >= 0",
    )
    parser.add_argument(
        "--top-k", type=number(int, minimum=0), default=defaults.top_k, help="top-k filter, >= 0 (0: off)"
    )
    parser.add_argument(
        "--top-p",
        type=number(float, minimum=0, below=1),
        default=defaults.top_p,
        help="top-p filter in [0, 1) (0: off)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(int, minimum=1),
        default=defaults.batch_size,
        help="images per sampling batch; the images depend on it (each batch draws from a stream of its own), so "
        "another batch size draws other images and gives other metrics, within sampling noise",
    )
    parser.add_argument(
        "--sampling-seed",
        "--seed",
        dest="sampling_seed",
        type=_sampling_seed,
        default=defaults.sampling_seed,
        help=f"seed of the sampling, an integer in [0, {MAX_SEED}] (batch b draws from seed * 1000003 + b)",
    )
    parser.add_argument(
        "--autocast-bf16",
        action=argparse.BooleanOptionalAction,
        default=OptimizationConfig.autocast_bf16,
        help="sample under bf16 autocast on CUDA",
    )
    parser.add_argument(
        "--compile-sampling",
        action=argparse.BooleanOptionalAction,
        default=ResourcesConfig.compile_sampling,
        help="draw with each scale's step torch.compile'd (CUDA graphs on CUDA; as resources.compile_sampling)",
    )
    parser.add_argument(
        "--skip-corrupt-images",
        action="store_true",
        help="drop the split's unreadable images (listed on stderr and in evaluation.json) instead of stopping",
    )
    parser.add_argument(
        "--cache",
        default="runs/reference-stats",
        help="folder of the cached reference statistics and of the split's image checks",
    )
    parser.add_argument("--out", required=True, help="folder for evaluation.json and the generated images")
    return parser


def _sampling_seed(text: str) -> int:
    """--seed's argparse type: an integer in [0, ``MAX_SEED``] (the schema's bound on every seed): a large one
    overflowed torch's 64-bit seed at the first batch, after the reference statistics."""
    try:
        seed = int(text)
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [0, {MAX_SEED}]")
    return seed


def main(argv: list[str] | None = None) -> int:
    """The command: 0 after writing OUT/evaluation.json; 2 with a last stderr line ``error: ...`` naming the bad
    input (checked before any image is decoded or generated), never a traceback."""
    return run_reporting(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from ..models import load_var, load_vqvae

    args = _parser().parse_args(argv)
    for option in ("var", "vqvae"):
        if not Path(getattr(args, option)).is_file():
            raise EvaluationError(f"--{option} {getattr(args, option)}: no such checkpoint file")
    if args.adapter is not None:
        _check_adapter(args.adapter)
    if args.extractor == INCEPTION and (
        args.inception_weights is None or not Path(args.inception_weights).is_file()
    ):
        raise EvaluationError(
            f"--inception-weights {args.inception_weights}: no such file (--extractor {INCEPTION} needs the local "
            f"{INCEPTION_WEIGHTS_FILE}; nothing is downloaded)"
            if args.inception_weights
            else f"--extractor {INCEPTION} needs --inception-weights (the local {INCEPTION_WEIGHTS_FILE})"
        )
    evaluation = evaluation_config(args)
    var_architecture = _var_architecture(args)
    vqvae_architecture = _saved_architecture(args.vqvae, kind="vqvae") or {}
    trained, base_sha256 = _check_models(args, var=var_architecture, vqvae=vqvae_architecture)
    out, cache = _writable_folder(args.out, "--out"), _writable_folder(args.cache, "--cache")
    images = read_dataset(args.dataset, args.root, args.split)
    # The model's classes are known from the sidecars: a split it cannot be scored on stops here, before any model
    # is loaded and the images are decoded (evaluate checks the loaded model's count, and the images kept, again).
    check_split_fits(images, num_classes=trained.num_classes, model=trained.model)
    # An adapter, or a checkpoint recording its training classes (a merged or exported fine-tuned model); a plain
    # checkpoint (the official ImageNet VAR, say) may be scored on any split of no more classes than it has.
    if args.adapter is not None or trained.names is not None:
        check_split_classes(
            images, class_names=trained.names, num_classes=trained.num_classes, model=trained.model
        )
    # The files themselves before the split is decoded: the extractor's weights, and the checkpoints' SHA-256s
    # against their sidecars (CRC-32s without one), as they are loaded.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = build_extractor(
        args.extractor, weights_path=args.inception_weights, cache_dir=cache
    )  # validates the weights
    var = load_var(args.var, **var_architecture, device=device)
    if args.adapter:
        from ..methods import load_adapter  # peft: imported only when an adapter is applied

        # In place: var becomes the fine-tuned model (checked above; load_adapter checks the tensors too).
        load_adapter(var, args.adapter, base_sha256=base_sha256)
    vqvae = load_vqvae(args.vqvae, **vqvae_architecture, device=device)
    # Kept in --cache by the split's paths, sizes and modification times, as the sweep keeps it: a second run over
    # the same files decodes none of them.
    images, skipped = check_images(
        images, skip_corrupt=args.skip_corrupt_images, cache_dir=cache, log=_to_stderr
    )
    for line in skipped:
        _to_stderr(f"skipped an unreadable image: {line}")
    # Before the evaluation: a checkpoint without a sidecar is hashed whole, and a file gone by the end would
    # lose the evaluation.
    inputs = _inputs_record(args, images, base_sha256=base_sha256, device=device)
    result = evaluate(
        var.eval(),
        vqvae,
        images,
        evaluation=evaluation,
        autocast_bf16=args.autocast_bf16,
        compiled_sampling=args.compile_sampling,
        cache=ReferenceStats(cache),
        feature_extractor=extractor,
        out_dir=out / "images",
        log=_to_stderr,  # the progress of a long evaluation; stdout holds only the metrics
    )
    result["skipped_images"] = skipped  # with --skip-corrupt-images: the split's unreadable images, dropped
    result["inputs"] = inputs
    # Atomic: a failed write (a full disk) leaves an earlier run's result whole, not a truncated file.
    atomic_write(out / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    print(json.dumps(result["metrics"], indent=1))
    return 0


def _inputs_record(
    args: argparse.Namespace, images: ImageList, *, base_sha256: str | None, device: str
) -> dict:
    """What was scored with what: the split (absolute root, images kept), the checkpoints and the adapter by path
    and SHA-256 (a folder's: over its files' names and bytes), and the device (bf16 autocast applies on CUDA
    alone): an evaluation.json read later, away from its command line, still says what it measured.
    ``base_sha256``: --var's, where the adapter check has computed it already."""
    adapter = None
    if args.adapter is not None:
        adapter = {"path": str(Path(args.adapter).resolve()), "sha256": _path_sha256(Path(args.adapter))}
    return {
        "dataset": args.dataset,
        "split": args.split,
        "root": str(Path(args.root).resolve()),
        "images": len(images),
        "var": {"path": str(Path(args.var).resolve()), "sha256": base_sha256 or checkpoint_sha256(args.var)},
        "vqvae": {"path": str(Path(args.vqvae).resolve()), "sha256": checkpoint_sha256(args.vqvae)},
        "adapter": adapter,
        "device": device,
    }


def _path_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's relative file names and their files' SHA-256s, in order."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_adapter(adapter: str) -> None:
    """--adapter: an ``adapter.pt`` file, or a peft adapter folder whose files and provenance are checked here,
    before any model is loaded (``_check_models`` checks both kinds against the base)."""
    if Path(adapter).is_dir():
        from ..peft_format import read_provenance  # peft: imported only when an adapter is applied

        read_provenance(adapter)
    elif not Path(adapter).is_file():
        raise EvaluationError(
            f"--adapter {adapter}: no such checkpoint file or peft adapter folder (adapter.pt, or the "
            "adapter-peft/ folder beside it)"
        )


@dataclass(frozen=True)
class _Classes:
    """The classes of the model the command evaluates: ``model`` names it (the --adapter's or the --var's),
    ``names`` are its training class names where it records them."""

    model: str
    num_classes: int
    names: tuple[str, ...] | None = None


def _check_models(args: argparse.Namespace, *, var: dict, vqvae: dict) -> tuple[_Classes, str | None]:
    """Check the models the command will load on weightless builds, from the sidecars, the adapter's record and
    the headers of checkpoints without a sidecar: VQVAE and VAR fit, --resolution is the VQVAE's, the adapter
    was trained on this base file and architecture. Returns the evaluated model's classes and, with an adapter,
    the base file's SHA-256 (for ``load_adapter``)."""
    from ..models import build_var, build_vqvae

    # The loaders' signatures only, for their defaults (from checkpoints: the package's names may be stand-ins).
    from ..models.checkpoints import load_var, load_vqvae

    base = _meta_model(args.var, var, build=build_var, loader=load_var, option="--var")
    tokenizer = _meta_model(args.vqvae, vqvae, build=build_vqvae, loader=load_vqvae, option="--vqvae")
    check_models_fit(base, tokenizer, names=(f"--var {args.var}", f"--vqvae {args.vqvae}"))
    if args.resolution is not None and tokenizer.image_size != args.resolution:
        raise EvaluationError(
            f"--resolution {args.resolution}: the --vqvae model {args.vqvae} makes {tokenizer.image_size}px images"
        )
    if args.adapter is None:
        return _Classes(
            f"--var {args.var}", base.num_classes, _var_class_names(args.var, base.num_classes)
        ), None
    from ..methods import adapter_record  # peft: imported only when an adapter is applied

    base_sha256 = checkpoint_sha256(args.var)
    adaptation, names = adapter_record(base, args.adapter, base_sha256=base_sha256)
    return _Classes(f"--adapter {args.adapter}", adaptation.num_classes, names), base_sha256


def _var_class_names(path: str, num_classes: int) -> tuple[str, ...] | None:
    """The training class names a --var checkpoint's sidecar records (a merged or exported fine-tuned model saved
    with ``save_var(class_names=...)``); None where it records none."""
    metadata = (read_sidecar(path) or {}).get("metadata")
    if not isinstance(metadata, dict):
        return None
    return recorded_class_names(path, metadata, num_classes=num_classes, what="--var")


def _meta_model(path: str, architecture: Mapping, *, build: Callable, loader: Callable, option: str):
    """The model ``loader`` will load from ``path``, built on the meta device (no weights): of ``architecture``
    (its sidecar's), completed with the loader's defaults (what it takes a checkpoint without one to be). A
    checkpoint without a sidecar has its header checked against it here; one with a sidecar is checked when
    loaded (its SHA-256 and the sidecar's architecture)."""
    assumed = {
        name: parameter.default
        for name, parameter in inspect.signature(loader).parameters.items()
        if parameter.default is not parameter.empty and name not in ("device", "dtype")
    }
    model = build(**{**assumed, **architecture}, device="meta")
    if read_sidecar(path) is None:
        _check_header(path, model, option=option)
    return model


def _check_header(path: str, model: torch.nn.Module, *, option: str) -> None:
    """Refuse a checkpoint file that is not readable or not of ``model``'s layout (keys, shapes, dtype kinds), from
    its header alone: loaded onto the meta device, no tensor data is read (the loader checks the values)."""
    try:
        state = read_checkpoint_header(path)
    except (CheckpointError, OSError) as err:
        raise EvaluationError(f"{option}: {err}") from err
    layout = f"{type(model).__name__} {option} is taken to be without a sidecar ({model.architecture})"
    check_state_dict(state, model.state_dict(), finite_keys=set(), path=path, what=layout)


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    """The command's options as the trial config's evaluation section (its checks name the field)."""
    return EvaluationConfig(
        extractor=args.extractor,
        inception_weights=args.inception_weights,
        num_images=args.num_images,
        guidance_scale=args.guidance_scale,
        top_k=args.top_k,
        top_p=args.top_p,
        batch_size=args.batch_size,
        sampling_seed=args.sampling_seed,
    )


def _var_architecture(args: argparse.Namespace) -> dict:
    """The ``load_var`` keywords of --var: its sidecar's architecture (a --depth or --num-classes that disagrees
    with it is refused, naming both values), else the official layout of --depth with --num-classes (1000)."""
    saved = _saved_architecture(args.var, kind="var")
    if saved is None:
        if args.depth is None:
            raise EvaluationError(
                f"--depth is needed: --var {args.var} has no sidecar {sidecar_path(args.var)} recording its architecture"
            )
        return {"depth": args.depth, "num_classes": 1000 if args.num_classes is None else args.num_classes}
    conflicts = [
        f"--{option} {given} but the checkpoint's sidecar records {key}={saved.get(key)}"
        for option, key, given in (
            ("depth", "depth", args.depth),
            ("num-classes", "num_classes", args.num_classes),
        )
        if given is not None and given != saved.get(key)
    ]
    if conflicts:
        raise EvaluationError(
            f"--var {args.var}: "
            + "; ".join(conflicts)
            + f" ({sidecar_path(args.var)}; leave the option out to use the sidecar's)"
        )
    return saved


def _saved_architecture(path: str, *, kind: str) -> dict | None:
    """The architecture recorded beside a checkpoint we saved (None without a sidecar); a sidecar of another kind
    of checkpoint is refused."""
    record = read_sidecar(path)
    if record is None:
        return None
    if record.get("kind") != kind:
        raise CheckpointError(
            f"{sidecar_path(path)} describes a {record.get('kind')!r} checkpoint, not a {kind!r} one"
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.get("architecture", {}).items()}


def _writable_folder(folder: str, option: str) -> Path:
    """``folder`` created and probed with a small file; ``EvaluationError`` naming ``option`` when it cannot be."""
    path = Path(folder)
    try:
        probe_folder(path)
    except OSError as err:
        raise EvaluationError(f"{option} {folder}: cannot write there ({err.strerror or err})") from err
    return path


if __name__ == "__main__":
    sys.exit(main())
