"""scripts/benchmark_evaluation_files.py: what an evaluation's PNG files cost beside drawing the images."""

from __future__ import annotations

import sys

import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from benchmark_evaluation_files import SIZE, drawing_loop, files_alone, photographs, tables


def test_photographs_are_distinct_crops_of_the_image_size():
    photos_N3HW = photographs(3)
    assert photos_N3HW.shape == (3, 3, SIZE, SIZE) and photos_N3HW.dtype == torch.uint8
    assert not torch.equal(photos_N3HW[0], photos_N3HW[1]) and torch.equal(photographs(3), photos_N3HW)
    assert photos_N3HW.float().std() > 20  # a photograph, not a flat image


def test_both_measurements_run_and_make_a_report():
    files = files_alone(images=4, threads=[1, 2], batch=2)
    assert files["png_kb"] > 10 and all(files[key] > 0 for key in ("write_serial_s", "read_serial_s"))
    loop = drawing_loop(images=2, batch=2)
    assert loop["same_images"] and loop["memory_s"] > 0 and loop["files_s"] > 0
    lines = tables(files, {"this tree": loop}, threads=[1, 2])
    assert any(line.startswith("| write, pool of 2 |") for line in lines)
    assert lines[-1].startswith("| this tree |") and lines[-1].endswith("| True |")
