"""Shared fixtures: the reference files in ../shared and tiny model builders."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

from trainables.methods import LoraLinear
from trainables.models import build_var, build_vqvae

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VARSWEEP_SHARED", REPO.parent / "shared"))

# Small enough for CPU tests: 16x16 images, 4x4 latent, 4 scales (L = 30 tokens).
TINY_VQVAE = dict(
    vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1, 2, 2), num_res_blocks=1
)
TINY_VAR = dict(
    depth=2, num_classes=5, patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, embed_dim=64, num_heads=2
)


def run_script(name: str, *args: str, timeout: float = 600) -> str:
    """``python scripts/<name> *args`` from the repository as a user runs it (its $OUT unset); its standard output.
    A failure fails the test with the end of its standard error."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    command = [sys.executable, f"scripts/{name}", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def reference_file(name: str) -> Path:
    """A file of ../shared/reference. In CI its absence is a failure; elsewhere (a public clone) a skip."""
    path = SHARED / "reference" / name
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"reference file {path} is missing (set VARSWEEP_SHARED to the shared folder)")
        pytest.skip(f"reference file {path} not available")
    return path


@pytest.fixture(scope="session")
def parity_fixture() -> dict:
    return torch.load(reference_file("var_parity_tiny.pt"), weights_only=True)


@pytest.fixture(scope="session")
def parity_config(parity_fixture) -> dict:
    return json.loads(parity_fixture["config"])


@pytest.fixture
def tiny_vqvae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vqvae(**TINY_VQVAE).eval()


@pytest.fixture
def tiny_var() -> torch.nn.Module:
    return build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0)).eval()


def lora_twins(
    alpha: float, *, rank: int = 4, features: tuple[int, int] = (24, 40), lora_bias: bool = False
) -> tuple[torch.nn.Module, LoraLinear]:
    """peft's stock LoRA linear layer and varsweep's, on the same base weights and (non-zero) adapter weights,
    drawn from seeded generators only (peft draws lora_A from the global one). ``features``: (in, out)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = torch.nn.Linear(*features).requires_grad_(False)  # frozen, as peft leaves it
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_bias=lora_bias)
        stock = peft.tuners.lora.layer.Linear(
            copy.deepcopy(base), "default", config=config, r=rank, lora_alpha=alpha
        )
        with torch.no_grad():
            for p in stock.lora_B["default"].parameters():
                p.normal_()
    ours = LoraLinear(copy.deepcopy(base), "default", config=config, r=rank, lora_alpha=alpha)
    ours.load_state_dict(stock.state_dict())
    return stock, ours
