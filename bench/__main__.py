"""``python -m bench``: list the sweeps, run one, or show its status.

  python -m bench list
  python -m bench sweep NAME [--smoke] [--where FIELD=VALUE] [--storage PATH_OR_URI] [--cache-dir DIR] [--assets DIR] [--dry-run] [--max-concurrent N]
  python -m bench status NAME [--smoke] [--where FIELD=VALUE] [--storage PATH_OR_URI] [--assets DIR]
  python -m bench demo [--storage runs/demo] [--smoke]   (the embedded default: the demo sweep, then a summary)
On a cluster started with ``ray up cluster.yaml`` submit the same command with ``ray job submit -- python -m bench ...``;
without a cluster a local Ray instance is started. Local paths may be relative to the current folder: they are made
absolute here, before anything reaches Ray. Every failure ends in one line ``error: ...`` and exit status 2
(``VARSWEEP_DEBUG=1`` shows the traceback too).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .results import ResultStore
from .schema import with_absolute_paths
from .sweeps import SWEEPS, build_sweep, describe
from .sweeps.common import Assets


def _common(parser: argparse.ArgumentParser, storage: str) -> None:
    parser.add_argument("name", choices=sorted(SWEEPS))
    parser.add_argument("--smoke", action="store_true", help="the sweep's smoke version: tiny base, offline data, CPU")
    parser.add_argument("--storage", default=storage, help="results and checkpoints: a local or shared path, or a URI (s3://...)")
    parser.add_argument("--assets", default=Assets.__dataclass_fields__["root"].default,
                        help="checkpoints/ and datasets/ of the paper sweeps (env VARSWEEP_ASSETS)")
    parser.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                        help="only the trials whose config has this value, e.g. method.name=lora (repeatable; as in python -m analysis)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="varsweep sweeps")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the sweeps and their sizes")
    sweep = commands.add_parser("sweep", help="run a sweep (relaunch to resume)")
    _common(sweep, "runs/sweeps")
    sweep.add_argument("--cache-dir", help="shared caches (default: STORAGE/cache for a path, ~/.cache/varsweep for a URI; env VARSWEEP_CACHE)")
    sweep.add_argument("--dry-run", action="store_true", help="check and print the grid, resources and estimated GPU hours; run and create nothing")
    sweep.add_argument("--max-concurrent", type=int, help="trials at once, >= 1 (default: as many as the cluster's resources fit)")
    sweep.add_argument("--address", help="Ray address (default: RAY_ADDRESS, a running cluster, else a new local Ray)")
    status = commands.add_parser("status", help="which trials of a sweep have results (reads only)")
    _common(status, "runs/sweeps")
    demo = commands.add_parser("demo", help="the embedded default: demo sweep on a local Ray, then its summary and checks")
    demo.add_argument("--storage", default="runs/demo")
    demo.add_argument("--smoke", action="store_true", help="a few steps only (CI): checks the pipeline, not the targets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("error: interrupted; relaunch the same command to resume (finished trials are kept)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one line, the traceback only when asked
        if os.environ.get("VARSWEEP_DEBUG"):
            traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0]
        details = str(err).strip().splitlines()[1:]
        print(f"error: {first or type(err).__name__}" + ("" if isinstance(err, (ValueError, OSError)) else f" ({type(err).__name__})"),
              file=sys.stderr)
        for line in details:  # a listing (every bad trial) stays readable, one item a line
            print(f"  {line.strip()}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        for name in sorted(SWEEPS):
            print(f"{name:<12} {len(build_sweep(name)):>3} trials ({len(build_sweep(name, smoke=True))} smoke)  {describe(name)}")
        return 0
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(storage=args.storage, smoke=args.smoke)
    configs = [with_absolute_paths(c) for c in build_sweep(args.name, smoke=args.smoke, assets=Assets(args.assets))]
    configs = select(configs, args.where, sweep=args.name)
    if args.command == "status":
        store = ResultStore(args.storage, create=False)
        if not store.exists():
            raise FileNotFoundError(f"no storage folder at {args.storage}: nothing has run there (give --storage of the sweep)")
        print(status_table(configs, store))
        return 0
    from .launcher import Launch, default_cache_dir, run_sweep
    launch = Launch(storage=args.storage, cache_dir=args.cache_dir or default_cache_dir(args.storage),
                    max_concurrent=args.max_concurrent, address=args.address)
    summary = run_sweep(args.name + ("-smoke" if args.smoke else ""), configs, launch, dry_run=args.dry_run)
    return 1 if summary["failed"] else 0


def select(configs: list, where: list[str], *, sweep: str) -> list:
    """The configs matching every ``FIELD=VALUE`` of ``where`` (dotted config paths, JSON values); none is an error."""
    from analysis.__main__ import parse_where
    from analysis.load import config_value

    wanted = parse_where(where)
    kept = [c for c in configs if all(config_value(c.to_dict(), path) == value for path, value in wanted.items())]
    if not kept:
        raise ValueError(f"no trial of sweep {sweep} has {' and '.join(where)} ({len(configs)} trials)")
    return kept


def status_table(configs, store: ResultStore) -> str:
    """One line per trial (finished with FID and epsilon, failed with its error's first line, invalid with the
    reason, pending), then the counts. Reads only."""
    lines = [f"{'trial':<44} {'id':<16} {'status':<8} {'FID':>8} {'epsilon':>8}  error"]
    counts: dict[str, int] = {}
    for c in configs:
        state, detail = store.state(c.trial_id)
        counts[state] = counts.get(state, 0) + 1
        record = store.read(c.trial_id) if state in ("success", "failed") else None
        fid = (record or {}).get("metrics", {}).get("fid")
        eps = ((record or {}).get("privacy") or {}).get("epsilon_rdp")
        lines.append(f"{c.label:<44} {c.trial_id:<16} {state:<8} {'' if fid is None else f'{fid:.2f}':>8} "
                     f"{'' if eps is None else f'{eps:.2f}':>8}  {detail}".rstrip())
    lines.append(", ".join(f"{counts[s]} {s}" for s in ("success", "failed", "invalid", "pending") if s in counts) + f" of {len(configs)} trials")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
