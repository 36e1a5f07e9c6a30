"""scripts/benchmark_dp_memory.py counts tensor memory itself: its counter must see creations and releases exactly,
views and in-place results as nothing new, and name the phase where the peak fell; its traffic counter must count
each operand read once and each result written once, views and allocations as nothing, a product's FLOPs, and put
an operation on the roofline at the slower of its two times."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from benchmark_dp_memory import H200_DATASHEET, LiveTensorBytes, Traffic, _phased, configurations

MIB = 1024**2


def test_counts_what_is_created_and_released_and_nothing_twice():
    before = torch.zeros(MIB // 4)  # made before the mode: updating it in place or viewing it creates nothing
    with LiveTensorBytes() as tracker:
        before.add_(1.0)
        before[:8].mul_(2.0)
        assert tracker.live == 0
        a = torch.ones(MIB // 4)  # 1 MiB of float32
        b = torch.ones(MIB // 2)  # 2 MiB
        view = b[: MIB // 4]
        view.add_(1.0)  # in place, on b's storage
        b.view(2, -1).mul_(2.0)
        assert tracker.live == 3 * MIB
        del b
        assert tracker.live == 3 * MIB  # the view keeps b's storage alive
        del view
        assert tracker.live == MIB
        c = a.to(torch.bfloat16)  # 0.5 MiB
        assert tracker.live == MIB + MIB // 2 and tracker.peak == 3 * MIB
        del a, c
    assert tracker.live == 0


def test_the_peak_is_placed_in_its_phase():
    """A model whose backward creates more than its forward (a gradient for its 4 MiB weight) and an update that
    creates more still (SGD's momentum buffer, 4 MiB, beside the gradient)."""
    model = torch.nn.Linear(1024, 1024, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = LiveTensorBytes()
    backward = torch.autograd.backward
    restore = _phased(model, optimizer, tracker)
    try:
        with tracker:
            model(torch.ones(2, 1024)).sum().backward()
            after_backward = tracker.peak, tracker.peak_phase
            optimizer.step()
    finally:
        restore()
    assert torch.autograd.backward is backward and optimizer.step.__func__ is torch.optim.SGD.step
    assert after_backward[1] == "backward" and after_backward[0] >= 4 * MIB
    assert tracker.peak_phase == "update" and tracker.peak >= 8 * MIB


def test_traffic_counts_reads_writes_flops_and_the_roofline():
    x = torch.ones(256, 1024)  # 1 MiB of float32
    w = torch.ones(1024, 1024, dtype=torch.bfloat16)  # 2 MiB
    with Traffic() as traffic:
        x.view(1024, 256).t()  # views: nothing moves
        torch.empty(1024, 1024)  # an allocation: nothing moves
        y = x * 2.0  # reads 1 MiB, writes 1 MiB
        y.add_(x)  # reads y and x, writes y: 3 MiB
        y.normal_()  # overwritten, not read: 1 MiB
        assert (traffic.kernels, traffic.bytes, traffic.flops) == (3, 6 * MIB, 0)
        element_wise_s = traffic.roofline_s
        z = x.bfloat16() @ w  # the cast (1 + 0.5 MiB), then a bf16 product: reads 0.5 + 2, writes 0.5 MiB
    assert traffic.kernels == 5 and traffic.bytes == 6 * MIB + 3 * MIB // 2 + 3 * MIB
    product_flops = 2 * 256 * 1024 * 1024
    assert traffic.flops == product_flops and z.dtype == torch.bfloat16
    assert element_wise_s == pytest.approx(6 * MIB / H200_DATASHEET["bytes"], rel=1e-12)
    product_s = max(product_flops / H200_DATASHEET["half_flops"], 3 * MIB / H200_DATASHEET["bytes"])
    cast_s = (3 * MIB // 2) / H200_DATASHEET["bytes"]
    assert traffic.roofline_s == pytest.approx(element_wise_s + cast_s + product_s, rel=1e-12)


def test_configurations_pair_each_dp_step_with_its_non_dp_step():
    """ "auto@R" is the auto routes with a keep ratio R, and every configuration carries the geometry asked for."""
    configs = configurations(
        "1:8",
        "bf16",
        routes="auto,auto@2.5",
        kernel_set="cuda",
        geometry=dict(width=1920, heads=30),
        methods="full",
    )
    assert [(c["dp"], c.get("route"), c.get("keep_ratio")) for c in configs] == [
        (False, None, None),
        (True, "auto", None),
        (True, "auto", 2.5),
    ]
    assert all(
        (c["method"], c["k"], c["rows"], c["width"], c["heads"]) == ("full", 1, 8, 1920, 30) for c in configs
    )
