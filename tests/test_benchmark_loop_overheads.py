"""scripts/benchmark_loop_overheads.py: the host work before each forward, and the all-reduces of DDP's gradient
averaging counted and timed beside one per parameter."""

from __future__ import annotations

import sys

from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "scripts"))

from benchmark_loop_overheads import count


def test_lora_s_gradients_take_one_all_reduce_and_full_fine_tuning_s_large_ones_their_own():
    lora, full = count(16, "lora"), count(16, "full")
    assert lora["per_parameter_collectives"] == lora["gradients"] == 161 and lora["averaged_collectives"] == 1
    # d16 full: 5 large matrices per block (qkv, proj, fc1, fc2, AdaLN) and the head, the class embedding, the
    # word embedding... alone; everything under 1 MiB together.
    assert full["gradients"] == 202 and 16 * 5 < full["averaged_collectives"] < full["gradients"] / 2


def test_the_script_times_both_forms_over_gloo_and_prints_its_tables():
    stdout = run_script(
        "benchmark_loop_overheads.py",
        "--depths",
        "2",
        "--timed-depth",
        "2",
        "--rounds",
        "1",
        "--methods",
        "lora",
    )
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    host = [line for line in rows if line.count("|") == 5 and line[2].isdigit()]
    assert len(host) == 3 and all(float(line.split("|")[4]) > 0 for line in host)
    accounting = [line for line in rows if line.count("|") == 6 and line[2].isdigit()]
    assert len(accounting) == 3 and all(
        float(cell) > 0 for line in accounting for cell in line.split("|")[3:6]
    )
    (lora,) = [line for line in rows if line.startswith("| 2 | lora |")]
    cells = [cell.strip() for cell in lora.split("|")[1:-1]]
    assert cells[5] == "1" and cells[4] == cells[2]  # one all-reduce now, one per gradient before
    assert float(cells[6]) > 0 and float(cells[7]) > 0 and cells[8].endswith("x")
