"""The embedded default, end to end on one CPU: ``python -m bench.demo --out runs/demo``.

1. train a tiny multi-scale VQVAE on the source domain (procedural shapes);
2. pre-train a tiny class-conditional VAR on its tokens (the stand-in for the official ImageNet VAR);
3. adapt it to the target domain (scikit-learn's handwritten digits): new class embedding, full fine-tuning;
4. report held-out token cross-entropy before and after adaptation and write sample grids.
The base models are saved with their config and reused when the demo is run again with the same settings.
Until the sweep harness exists this is the largest end-to-end path; it becomes the ``demo`` sweep later.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torchvision.utils import save_image

from trainables.data import offline
from trainables.models import (CheckpointError, build_var, build_vqvae, load_var, load_vqvae, resize_class_embedding,
                               save_var, save_vqvae)
from trainables.models.checkpoints import sidecar_path
from trainables.pretrain import Schedule, encode_tokens, reconstruction_mse, token_nll, train_var, train_vqvae


@dataclass(frozen=True)
class DemoConfig:
    image_size: int = 16
    shapes_per_class: int = 200
    vqvae: dict = field(default_factory=lambda: dict(vocab_size=256, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1, 2, 2), num_res_blocks=1))
    var: dict = field(default_factory=lambda: dict(depth=4, embed_dim=128, num_heads=2, drop_path_rate=0.0))
    vqvae_schedule: Schedule = Schedule(steps=600, batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.0, log_every=100)
    pretrain_schedule: Schedule = Schedule(steps=600, batch_size=64, lr=1e-3, warmup_steps=50, log_every=100)
    finetune_schedule: Schedule = Schedule(steps=300, batch_size=64, lr=3e-4, warmup_steps=20, log_every=100)
    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.96
    seed: int = 0

    def base_record(self) -> dict:
        """The settings that determine the base models (reuse is allowed only when these are unchanged)."""
        record = asdict(self)
        for key in ("finetune_schedule", "cfg", "top_k", "top_p"):
            record.pop(key)
        return json.loads(json.dumps(record))


def _log(stage: str):
    return lambda entry: print(f"[{stage}] " + " ".join(f"{k}={v}" for k, v in entry.items()), flush=True)


def _base_models(config: DemoConfig, out: Path, source: offline.ImageSet):
    vqvae_path, var_path = out / "base" / "vqvae.pth", out / "base" / "var_base.pth"
    var_layout = dict(config.var, num_classes=source.num_classes, patch_nums=config.vqvae["patch_nums"],
                      vocab_size=config.vqvae["vocab_size"], z_channels=config.vqvae["z_channels"])
    try:
        vqvae = load_vqvae(vqvae_path, **config.vqvae)
        var = load_var(var_path, **var_layout)
        if json.loads(sidecar_path(var_path).read_text())["metadata"].get("demo") == config.base_record():
            print(f"reusing the base models in {out / 'base'}", flush=True)
            return vqvae, var, {}
    except (CheckpointError, OSError, KeyError, json.JSONDecodeError):
        pass
    torch.manual_seed(config.seed)
    vqvae = build_vqvae(**config.vqvae)
    vq_history = train_vqvae(vqvae, source.images_N3HW, schedule=config.vqvae_schedule, seed=config.seed, log=_log("vqvae"))
    save_vqvae(vqvae, vqvae_path, metadata={"demo": config.base_record()})
    var = build_var(**var_layout, generator=torch.Generator().manual_seed(config.seed))
    tokens = encode_tokens(vqvae, source.images_N3HW)
    var_history = train_var(var, vqvae, tokens, source.labels_N, schedule=config.pretrain_schedule, seed=config.seed, log=_log("pretrain"))
    save_var(var, var_path, metadata={"demo": config.base_record()})
    return vqvae, var, {"vqvae": vq_history, "pretrain": var_history}


def _sample_grid(var, vqvae, *, num_classes: int, per_class: int, config: DemoConfig, generator: torch.Generator) -> torch.Tensor:
    labels_B = torch.arange(num_classes).repeat_interleave(per_class)
    return var.sample(labels_B, vqvae=vqvae, cfg=config.cfg, top_k=config.top_k, top_p=config.top_p, generator=generator)


def _real_grid(images: offline.ImageSet, per_class: int) -> torch.Tensor:
    rows = [images.images_N3HW[torch.nonzero(images.labels_N == k).flatten()[:per_class]] for k in range(images.num_classes)]
    return torch.cat(rows).float() / 255


def run_demo(config: DemoConfig, out: Path) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    source = offline.shapes(split="train", images_per_class=config.shapes_per_class, image_size=config.image_size, seed=config.seed)
    source_test = offline.shapes(split="test", images_per_class=max(10, config.shapes_per_class // 4), image_size=config.image_size, seed=config.seed)
    target, target_test = (offline.digits(split=s, image_size=config.image_size, seed=config.seed) for s in offline.SPLITS)
    vqvae, base, histories = _base_models(config, out, source)

    target_tokens, target_test_tokens = encode_tokens(vqvae, target.images_N3HW), encode_tokens(vqvae, target_test.images_N3HW)
    adapted = resize_class_embedding(copy.deepcopy(base), target.num_classes, init="unconditional")
    histories["finetune"] = train_var(adapted, vqvae, target_tokens, target.labels_N, schedule=config.finetune_schedule,
                                      seed=config.seed, log=_log("finetune"))
    save_var(adapted, out / "var_digits_full.pth", metadata={"demo": json.loads(json.dumps(asdict(config)))})

    unconditional_N = torch.full_like(target_test.labels_N, base.unconditional_label)
    metrics = {
        "vqvae_reconstruction_mse_source_test": reconstruction_mse(vqvae, source_test.images_N3HW),
        "vqvae_reconstruction_mse_target_test": reconstruction_mse(vqvae, target_test.images_N3HW),
        "source_test_token_nll_base": token_nll(base, vqvae, encode_tokens(vqvae, source_test.images_N3HW), source_test.labels_N),
        "target_test_token_nll_base_unconditional": token_nll(base, vqvae, target_test_tokens, unconditional_N),
        "target_test_token_nll_adapted": token_nll(adapted, vqvae, target_test_tokens, target_test.labels_N),
    }
    generator = torch.Generator().manual_seed(config.seed)
    grids = {"samples_base_shapes.png": _sample_grid(base, vqvae, num_classes=source.num_classes, per_class=8, config=config, generator=generator),
             "samples_adapted_digits.png": _sample_grid(adapted, vqvae, num_classes=target.num_classes, per_class=8, config=config, generator=generator),
             "real_shapes.png": _real_grid(source_test, 8), "real_digits.png": _real_grid(target_test, 8)}
    for name, images in grids.items():
        save_image(images, out / name, nrow=8, padding=1)
    summary = {"config": json.loads(json.dumps(asdict(config))), "metrics": metrics, "history": histories,
               "wall_seconds": round(time.perf_counter() - started, 1), "outputs": sorted(grids)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (reused base models live in OUT/base)")
    args = parser.parse_args(argv)
    summary = run_demo(DemoConfig(), args.out)
    print(json.dumps(summary["metrics"], indent=1))
    print(f"done in {summary['wall_seconds']} s; sample grids and summary.json in {args.out}")


if __name__ == "__main__":
    main()
