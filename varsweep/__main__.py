"""``varsweep COMMAND ...``: ``varsweep analysis ...`` (or ``varsweep report ...``) is ``python -m analysis ...``;
every other command (``list``, ``sweep``, ``status``, ``demo``, ``upgrade-results``) is ``python -m bench ...``.

Light on purpose: it imports the side it dispatches to and nothing more, so ``varsweep analysis`` works from the
analysis-only install (``pip install varsweep``: no torch, no Ray), and the training side, when it is not
installed, fails with the command that installs it (``bench.cli.run_reporting``)."""

from __future__ import annotations

import contextlib
import io
import sys

ANALYSIS_COMMANDS = ("analysis", "report")
HELP_WORDS = ("-h", "--help", "help")
USAGE = "usage: varsweep COMMAND [ARGS ...]   (varsweep COMMAND --help for a command's options)"
INTRO = """\
One command for varsweep's sweeps and their analysis:

  varsweep analysis RESULTS_DIR --out OUT_DIR [...]
                        tables, figures and a report page from a sweep's results (same as python -m analysis;
                        `varsweep report` is the same command); needs only `pip install varsweep`
  varsweep SWEEP_COMMAND ...
                        sweeps on Ray, one of the commands below (same as python -m bench); running a sweep
                        needs `pip install 'varsweep[train]'`

The sweep commands (python -m bench):
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default: the command line) and return the exit status of the command it ran."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        print("error: varsweep: no command given (see varsweep --help)", file=sys.stderr)
        return 2
    if argv[0] in HELP_WORDS:
        print(f"{USAGE}\n\n{INTRO}{bench_commands()}")
        return 0
    if argv[0] in ANALYSIS_COMMANDS:
        from analysis.__main__ import main as analysis_main

        return analysis_main(argv[1:])
    from bench.__main__ import main as bench_main

    return bench_main(argv)


def bench_commands() -> str:
    """The command list of ``python -m bench --help`` (its positional-arguments section), from bench's own parser
    so that it stays complete when bench gains a command. bench's CLI imports no torch or Ray, so this works from
    the light install too."""
    from bench.__main__ import main as bench_main

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.suppress(SystemExit):
        bench_main(["--help"])
    lines = captured.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("{")), len(lines))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
