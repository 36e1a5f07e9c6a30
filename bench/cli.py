"""What the command-line entry points (``python -m bench``, ``python -m analysis``,
``python -m trainables.evaluation.evaluate``) share: a bad command line or a bad input ends in exit status 2 and a
last stderr line ``error: ...`` that names the input and the problem, never a traceback (``VARSWEEP_DEBUG=1``
shows it too). Standard library only (``analysis`` imports this and neither torch nor Ray)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .errors import VarsweepError

EXIT_ERROR = 2
# The training side's packages (the `train` extra, by import name): from the analysis-only install
# (`pip install varsweep`) a command that needs one ends in the command that installs them, not "No module named".
# ``require_training_side`` looks for them in this order: torch first, which the others need, so a light install
# is told about torch (the line README.md quotes), then the rest in a fixed order.
TRAINING_PACKAGES = ("torch", "torchvision", "opacus", "peft", "torch_fidelity", "ray", "sklearn", "psutil")
TRAIN_INSTALL = "pip install 'varsweep[train]'"


class UsageError(VarsweepError):
    """A command line that does not parse: an unknown option or choice, a value of the wrong type or range."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises ``UsageError`` instead of printing ``prog: error:`` and exiting, so
    every failure of a command reaches the same one-line report (and an in-process ``main(argv)`` returns 2)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def report(err: BaseException | str, *, stream: TextIO | None = None) -> int:
    """Print ``err`` for a person and return exit status 2. A message of one line becomes ``error: <message>``; a
    message with a listing (every bad trial, every invalid file) prints the listing first, indented, and ends
    with the ``error:`` line, which then also names the first listed item, so the last line alone says which
    input is wrong and why. Errors that are not about an input (a bug) carry their type name."""
    stream = stream or sys.stderr
    first, *details = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    for line in details:
        print(f"  {line.strip()}", file=stream)
    if details and first.rstrip().endswith(":"):
        # The items are the least indented lines; the lines under each (the trials it affects) are not counted.
        indents = [len(line) - len(line.lstrip()) for line in details]
        items = indents.count(min(indents))
        more = f" (and {items - 1} more listed above)" if items > 1 else ""
        first = f"{first.rstrip().rstrip(':')}: {_first_item(details)}{more}"
    elif details:
        first += " (details above)"
    known = isinstance(err, (str, ValueError, OSError))
    print(f"error: {first}" + ("" if known else f" ({type(err).__name__})"), file=stream)
    return EXIT_ERROR


def _first_item(details: list[str]) -> str:
    """The first listed item, with the first line under it while it is itself a heading ("invalid privacy
    settings:"): the ``error:`` line names the problem, not only its kind."""
    item, below = details[0].strip(), iter(details[1:])
    while item.endswith(":") and (line := next(below, None)) is not None:
        item = f"{item} {line.strip().removeprefix('- ')}"
    return item


def run_reporting(command: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Run ``command``; turn every exception into ``report``'s lines (status 2), an interrupt into status 130
    with the line ``error: <interrupted>``."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("VARSWEEP_DEBUG"):
            traceback.print_exc()
        missing = missing_training_package(err)
        if missing:
            return report(
                f"{missing} is not installed: this command needs varsweep's training side, "
                f"which an analysis-only install leaves out; install it with: {TRAIN_INSTALL}"
            )
        return report(err)


def require_training_side() -> None:
    """Raise ``ModuleNotFoundError`` for the first training-side package (in ``TRAINING_PACKAGES``' order: torch
    first) that is not installed, before a command that needs them creates any folder (``run_reporting`` turns it
    into the line naming ``TRAIN_INSTALL``)."""
    for name in TRAINING_PACKAGES:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def missing_training_package(err: BaseException) -> str | None:
    """The training-side package (import name) whose absence ``err`` reports, or None for any other error."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        package = err.name.split(".")[0]
        return package if package in TRAINING_PACKAGES else None
    return None


def path_text(text: str) -> str:
    """An argparse ``type`` for a path or URI: an empty one (an unset variable, ``--out "$OUT"``) is refused; as
    ``.`` it would write into, or read, whatever folder the command ran in."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable?); give a folder")
    return text


def number(
    kind: type,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    above: float | None = None,
) -> Callable[[str], float]:
    """An argparse ``type`` for a finite ``kind`` (int or float) in a range; a wrong value names itself and the
    range (argparse adds the option's name)."""
    bounds = [
        f">= {minimum:g}" if minimum is not None else "",
        f"> {above:g}" if above is not None else "",
        f"<= {maximum:g}" if maximum is not None else "",
        f"< {below:g}" if below is not None else "",
    ]
    wanted = f"{'an integer' if kind is int else 'a number'}" + (
        f" {' and '.join(b for b in bounds if b)}" if any(bounds) else ""
    )

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if (
            not math.isfinite(value)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
            or (below is not None and value >= below)
            or (above is not None and value <= above)
        ):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def probe_folder(folder: str | os.PathLike) -> None:
    """Create ``folder`` (and its parents) and write, then delete, a small file in it. Raises ``OSError`` when it
    cannot be made or written (a file in the way, read-only, out of quota); callers name the option in their error."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
        pass
