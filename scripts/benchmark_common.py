"""Shared by the benchmark scripts: the machine line and how a report is printed and appended."""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> str:
    return (f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 1024 ** 3:.0f} GiB, "
            f"CPU fp32, torch {torch.__version__}")


def publish(text: str, out: Path | None) -> None:
    """Print the report and append it to ``out`` (docs/benchmarks.md) when given."""
    print(text)
    if out:
        with open(out, "a") as handle:
            handle.write("\n" + text)
