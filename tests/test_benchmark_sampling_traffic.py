"""scripts/benchmark_sampling_traffic.py: one eager sampling call counted as CUDA runs it, its decode apart, and the
cost per image and per call fitted between two batch sizes."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from benchmark_sampling_traffic import measure, operations, per_image, table


def _row(code: str, batch: int, *, per_image_ms: float, fixed_ms: float) -> dict:
    """A synthetic count: the call costs ``fixed + batch * per_image`` (ms and, x10, GB), the decode half of it."""
    call_ms = fixed_ms + batch * per_image_ms
    call = {"gb": 10 * call_ms, "tflop": call_ms, "kernels": 100, "roofline_ms": call_ms}
    call["by_op_ms"] = {"addmm.default": 0.75 * call_ms, "gelu.default": 0.25 * call_ms}
    decode = {
        "gb": 5 * call_ms,
        "tflop": call_ms / 2,
        "kernels": 40,
        "roofline_ms": call_ms / 2,
        "by_op_ms": {},
    }
    return {"code": code, "batch": batch, "call": call, "decode": decode}


def test_the_fit_recovers_the_cost_per_image_and_per_call():
    rows = [_row("old", b, per_image_ms=2.0, fixed_ms=0.8) for b in (8, 16)]
    rows += [_row("new", b, per_image_ms=1.0, fixed_ms=0.8) for b in (8, 16)]
    fit = per_image(rows[0], rows[1], "call")
    assert fit["per_image"]["roofline_ms"] == pytest.approx(2.0)
    assert fit["per_call"]["roofline_ms"] == pytest.approx(0.8)
    assert fit["per_image"]["gb"] == pytest.approx(20.0)
    tokens = per_image(rows[0], rows[1], "tokens")  # the call less the decode
    assert tokens["per_image"]["roofline_ms"] == pytest.approx(1.0) and tokens["kernels"] == 60
    lines = table(rows)
    assert "| old | call | " in lines[2] and lines[2].endswith("| 500 |")  # 1 / 2 ms per image
    assert lines[5].startswith("| new | call |") and lines[5].endswith("| 1000 |")
    listed = operations(rows)
    assert listed[0] == "| operation | old | new |"
    assert (
        listed[2] == "| addmm.default | 1.500 | 0.750 |" and listed[3] == "| gelu.default | 0.500 | 0.250 |"
    )


def test_a_sampling_call_is_counted_with_its_decode_inside_it():
    """A one-block model at batch 1: the call moves more than its decode, which is counted apart on a latent of the
    call's shape, and its convolutions' FLOPs are part of the call's."""
    row = measure(depth=1, batch=1, vqvae_channels=32)
    call, decode = row["call"], row["decode"]
    assert 0 < decode["gb"] < call["gb"] and 0 < decode["tflop"] < call["tflop"]
    assert 0 < decode["kernels"] < call["kernels"] and decode["roofline_ms"] < call["roofline_ms"]
    assert call["by_op_ms"]["convolution.default"] >= decode["by_op_ms"]["convolution.default"] > 0
