"""Evaluate a (fine-tuned) VAR on a dataset split: generate per the split's class counts, extract features, compute
FID, precision/recall (k=3) and KID against cached reference statistics of the real split.

Also a standalone command for a saved checkpoint (base + adapter, or a merged checkpoint):

    python -m trainables.evaluation.evaluate --var BASE.pth --depth 16 [--adapter ADAPTER.pt] --vqvae VAE.pth \
        --dataset flowers102 --root /data --split test --extractor inception-v3-compat \
        --inception-weights /weights/weights-inception-2015-12-05-6726825d.pth --out runs/eval
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data.datasets import ImageList, check_images, eval_transform, read_dataset
from ..models import VAR, VQVAE
from ..models.checkpoints import sidecar_path
from ..profiling import PETA, count_flops
from ..progress import Log, Progress
from .classifier import DigitsCNN, class_accuracy, predict
from .features import SUBSTITUTE, build_extractor, extract_features, uint8_batches
from .generate import SamplingSettings, generate, generation_plan, read_generated
from .metrics import ReferenceKey, ReferenceStats, fid_from_statistics, gaussian_statistics, kid, precision_recall


@dataclass(frozen=True)
class EvaluationSettings:
    """Recorded with every result: what the numbers mean."""

    extractor: str = SUBSTITUTE
    resolution: int = 256
    num_images: int | None = None  # None: as many per class as the split has
    neighborhood: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000


def real_images_uint8(images: ImageList, resolution: int, *, batch_size: int = 64):
    """The split's images, resized and centre-cropped as for evaluation, as uint8 batches [B, 3, R, R]."""
    transform = eval_transform(resolution)
    for start in range(0, len(images), batch_size):
        batch = []
        for path in images.paths[start: start + batch_size]:
            with Image.open(path) as image:
                batch.append(transform(image.convert("RGB")).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8))
        yield torch.stack(batch)


def reference_statistics(images: ImageList, *, extractor, settings: EvaluationSettings, cache: ReferenceStats,
                         device: torch.device | str = "cpu") -> tuple[dict, bool]:
    """(mu, sigma, features) of the real split, computed once per (dataset, split, resolution, extractor)."""
    key = ReferenceKey(images.name, images.split, settings.resolution, extractor.name, len(images), images.fingerprint())
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    features = extract_features(extractor, real_images_uint8(images, settings.resolution), device=device)
    return cache.save(key, features), False


def evaluate(var: VAR, vqvae: VQVAE, images: ImageList, *, settings: EvaluationSettings, sampling: SamplingSettings,
             cache: ReferenceStats, extractor=None, inception_weights: str | None = None, out_dir: str | Path | None = None,
             classifier: tuple[DigitsCNN, dict] | None = None, log: Log | None = None) -> dict:
    """Metrics of ``var`` against the real split ``images`` with the evaluation and sampling settings recorded.
    ``classifier`` (model, record) adds the class accuracy of the generated images (does each show its class?)."""
    device = next(var.parameters()).device
    if vqvae.image_size != settings.resolution:
        raise ValueError(f"the model generates {vqvae.image_size}px images but the evaluation resolution is {settings.resolution}px")
    extractor = (extractor or build_extractor(settings.extractor, weights_path=inception_weights)).to(device)
    started = time.perf_counter()
    reference, hit = reference_statistics(images, extractor=extractor, settings=settings, cache=cache, device=device)
    reference_seconds = time.perf_counter() - started
    plan = generation_plan(list(images.class_counts.values()), total=settings.num_images)
    started = time.perf_counter()
    generated, requested_N = generate(var, vqvae, plan, settings=sampling, out_dir=out_dir,
                                      progress=Progress("evaluation", "generated image", sum(plan), log=log))
    if out_dir is not None:
        generated, requested_N = read_generated(out_dir, plan)
    generation_seconds = time.perf_counter() - started
    scoring = Progress("evaluation", "scoring", 1, log=log)
    features = extract_features(extractor, uint8_batches(generated), device=device)
    real = torch.from_numpy(reference["features"]).double()
    metrics = {"fid": fid_from_statistics(gaussian_statistics(features), {"mu": reference["mu"], "sigma": reference["sigma"]}),
               **precision_recall(features, real, neighborhood=settings.neighborhood),
               **kid(features, real, subsets=settings.kid_subsets, subset_size=settings.kid_subset_size)}
    recorded = {**asdict(settings), "extractor": extractor.name}
    if classifier is not None:
        model, record = classifier
        metrics.update(class_accuracy(predict(model.to(device), generated), requested_N, classes=len(plan)))
        recorded["classifier"] = {key: record[key] for key in ("name", "test_accuracy", "weights_sha256", "input_size")}
    scoring.update(1, " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    per_image = _sampling_flops_per_image(var, vqvae, label=next(i for i, c in enumerate(plan) if c > 0), sampling=sampling)
    compute = {"sample_flops_per_image": per_image, "sample_pflops": per_image * len(generated) / PETA,
               "images_per_second": len(generated) / generation_seconds if generation_seconds else None}
    return {"metrics": metrics, "evaluation_settings": recorded, "compute": compute,
            "sampling": sampling.to_dict(), "images_generated": len(generated), "plan": plan,
            "reference_cache_hit": hit, "reference_seconds": reference_seconds, "generation_seconds": generation_seconds}


def _sampling_flops_per_image(var: VAR, vqvae: VQVAE, *, label: int, sampling: SamplingSettings) -> int:
    """FLOPs of generating one image (both CFG branches, all scales, VQVAE decoding); linear in the batch."""
    device = next(var.parameters()).device
    flops, _ = count_flops(lambda: var.sample(torch.tensor([label], device=device), vqvae=vqvae, cfg=sampling.cfg, top_k=sampling.top_k,
                                              top_p=sampling.top_p, generator=torch.Generator(device=device).manual_seed(0)))
    return flops


def main(argv: list[str] | None = None) -> None:
    from ..methods import load_adapter
    from ..models import load_var, load_vqvae
    parser = argparse.ArgumentParser(description="Evaluate a saved VAR checkpoint (FID, precision/recall, KID).")
    parser.add_argument("--var", required=True, help="base (or merged) VAR checkpoint")
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the --var checkpoint")
    parser.add_argument("--adapter", help="adapter saved by methods.save_adapter, applied to --var")
    parser.add_argument("--vqvae", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--extractor", default="inception-v3-compat")
    parser.add_argument("--inception-weights")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/reference-stats")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images, _ = check_images(read_dataset(args.dataset, args.root, args.split))  # fails before any compute
    var = load_var(args.var, **_saved_architecture(args.var, depth=args.depth, num_classes=args.num_classes), device=device)
    if args.adapter:
        var = load_adapter(var, args.adapter)
    vqvae_architecture = _saved_architecture(args.vqvae)
    vqvae = load_vqvae(args.vqvae, **vqvae_architecture, device=device)
    result = evaluate(var.eval(), vqvae, images, cache=ReferenceStats(args.cache), inception_weights=args.inception_weights,
                      settings=EvaluationSettings(extractor=args.extractor, resolution=args.resolution, num_images=args.num_images),
                      sampling=SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed),
                      out_dir=Path(args.out) / "images")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "evaluation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["metrics"], indent=1))


def _saved_architecture(path: str, **official) -> dict:
    """The architecture recorded beside a checkpoint we saved, else the official one (``official`` keywords)."""
    side = sidecar_path(path)
    if not side.is_file():
        return official
    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(side.read_text())["architecture"].items()}


if __name__ == "__main__":
    main()
