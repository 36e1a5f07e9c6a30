"""What an evaluation's image files cost beside drawing the images: the lossless PNGs a trial writes of every
generated image (and, before the writer pool, read back before scoring), timed on this machine; optionally beside
another git revision's code.

Usage: python scripts/benchmark_evaluation_files.py [--images 256] [--threads 1,2,8] [--versus REV]
                                                    [--out docs/benchmarks.md]

Two measurements, each in its own process:
1. The files alone, on photographs: ``--images`` 256 x 256 crops of matplotlib's sample photograph (random places,
   scales and flips: PNGs of the size a generated photograph makes, ~130 kB), written as trials write them (PNG,
   atomic: a temporary file, fsync, rename) on one thread, as the drawing loop did, and on the writer pool
   (``PngWriter``) at each ``--threads``; and read back as the scoring step did. Seconds per image.
2. The drawing loop as a trial runs it (``generate`` with an output folder, then a read-back where that revision's
   ``generate`` returned no images), beside the same call without a folder (images in memory only), on a VAR-d2
   and a 32-channel VQVAE at 256 px (random weights; their images compress like the photographs). The difference
   is what the files add per image. On this CPU the drawing itself competes with the writer for the cores; on a
   GPU machine the cores are free, and the first measurement's serial figure is what each image waited for.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import benchmark_common
import numpy as np
import torch
from PIL import Image

from bench.schema import SUBSTITUTE_EXTRACTOR, EvaluationConfig

ROOT = Path(__file__).resolve().parent.parent
SIZE = 256  # the official VQVAE's images


def photographs(count: int, *, seed: int = 0) -> torch.Tensor:
    """``count`` uint8 [3, 256, 256] crops of matplotlib's sample photograph (random place, scale, flip)."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photo = Image.open(handle).convert("RGB")
        photo.load()
    rng = random.Random(seed)
    crops = []
    for _ in range(count):
        side = rng.randint(SIZE, min(photo.size))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
    return torch.stack(crops)


def files_alone(*, images: int, threads: list[int], batch: int) -> dict:
    """Seconds per image: writing ``images`` photographs serially and on the pool, and reading them back."""
    from trainables.evaluation.generate import PngWriter, _read_png, _write_pngs

    photos = photographs(images)
    batches = [(start, photos[start : start + batch]) for start in range(0, images, batch)]
    row = {"png_kb": None}
    with tempfile.TemporaryDirectory() as folder:

        def paths(run: str, start: int, count: int) -> list[Path]:
            return [Path(folder) / run / f"{start + i:06d}.png" for i in range(count)]

        started = time.perf_counter()
        for start, part in batches:
            _write_pngs(paths("serial", start, len(part)), part)
        row["write_serial_s"] = (time.perf_counter() - started) / images
        written = sorted((Path(folder) / "serial").glob("*.png"))
        row["png_kb"] = sum(p.stat().st_size for p in written) / len(written) / 1e3
        started = time.perf_counter()
        for path in written:
            _read_png(path)
        row["read_serial_s"] = (time.perf_counter() - started) / images
        for count in threads:
            started = time.perf_counter()
            with PngWriter(threads=count) as writer:
                for start, part in batches:
                    writer.submit(paths(f"pool{count}", start, len(part)), part)
            row[f"write_pool{count}_s"] = (time.perf_counter() - started) / images
    return row


def drawing_loop(*, images: int, batch: int) -> dict:
    """Seconds per image of ``generate`` with and without an output folder (plus a read-back where this code's
    ``generate`` returns no images from a folder), on a small 256 px model; and the images' equality."""
    from trainables.evaluation import generate as generation

    vqvae, var = benchmark_common.official_models(depth=2, num_classes=10, vqvae_channels=32)
    var.eval()
    evaluation = EvaluationConfig(extractor=SUBSTITUTE_EXTRACTOR, batch_size=batch)
    plan = generation.generation_plan([1] * 10, total=images)
    kwargs = dict(evaluation=evaluation, autocast_bf16=False)
    generation.generate(var, vqvae, [1], **kwargs)  # first call: lazy buffers, thread pools
    started = time.perf_counter()
    in_memory, _ = generation.generate(var, vqvae, plan, **kwargs)
    memory_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        scored, _ = generation.generate(var, vqvae, plan, out_dir=folder, **kwargs)
        if scored is None:  # this revision's generate wrote the files only: the evaluation read them back
            scored, _ = generation.read_generated(folder, plan)
        files_s = time.perf_counter() - started
    return {
        "memory_s": memory_s / images,
        "files_s": files_s / images,
        "added_s": (files_s - memory_s) / images,
        "same_images": bool(torch.equal(scored, in_memory)),
    }


MEASUREMENTS = {"files_alone": files_alone, "drawing_loop": drawing_loop}


def measure(one: dict) -> dict:
    return MEASUREMENTS[one.pop("what")](**one)


def tables(files: dict, loops: dict[str, dict], *, threads: list[int]) -> list[str]:
    ms = 1e3
    lines = [
        "| files alone | ms per image | speed-up over one thread |",
        "|---|---|---|",
        f"| write, one thread (the drawing loop's) | {ms * files['write_serial_s']:.2f} | 1.00x |",
    ]
    for count in threads:
        seconds = files[f"write_pool{count}_s"]
        lines.append(
            f"| write, pool of {count} | {ms * seconds:.2f} | {files['write_serial_s'] / seconds:.2f}x |"
        )
    lines += [
        f"| read back, one thread (the scoring step's) | {ms * files['read_serial_s']:.2f} | |",
        "",
        f"PNGs of {files['png_kb']:.0f} kB on average.",
        "",
        "| code | drawing, in memory (ms per image) | with the folder (ms per image) | the files add (ms per image) "
        "| same images |",
        "|---|---|---|---|---|",
    ]
    for name, row in loops.items():
        lines.append(
            f"| {name} | {ms * row['memory_s']:.1f} | {ms * row['files_s']:.1f} | {ms * row['added_s']:.1f} | "
            f"{row['same_images']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", default="1,2,8", help="writer pool sizes to time")
    parser.add_argument("--batch", type=int, default=EvaluationConfig.batch_size)
    benchmark_common.add_revision_arguments(parser)
    args = parser.parse_args()
    if args.one:
        benchmark_common.check_imported_from(args.expect)
        print(json.dumps(measure(json.loads(args.one))))
        return
    threads = sorted({int(t) for t in args.threads.split(",")})
    script = str(Path(__file__).resolve())
    files = benchmark_common.run_child(
        script,
        {"what": "files_alone", "images": args.images, "threads": threads, "batch": args.batch},
        code=ROOT,
    )
    print(json.dumps(files), flush=True)
    loops = {}
    with benchmark_common.revision_checkout(args.versus, "evaluation-files") as versus:
        for name, code in (({args.versus: versus} if versus else {}) | {"this tree": ROOT}).items():
            one = {"what": "drawing_loop", "images": args.images, "batch": args.batch}
            loops[name] = benchmark_common.run_child(script, one, code=code)
            print(json.dumps({"code": name, **loops[name]}), flush=True)
    command = f"python scripts/benchmark_evaluation_files.py --images {args.images} --threads {args.threads}"
    command += f" --batch {args.batch}" + (f" --versus {args.versus}" if args.versus else "")
    section = [
        f"### An evaluation's image files beside drawing the images ({benchmark_common.stamp()})",
        "",
        f"Machine: {benchmark_common.machine()}. Script: `{command}`.",
        "",
        *tables(files, loops, threads=threads),
        "",
    ]
    benchmark_common.publish("\n".join(section), args.out)


if __name__ == "__main__":
    main()
