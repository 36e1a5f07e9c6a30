"""``python -m bench``: list the sweeps, run one, show its status, or upgrade older results.

  python -m bench list
  python -m bench sweep NAME_OR_FILE [--smoke] [--where FIELD=VALUE] [--storage PATH_OR_URI] [--cache-dir DIR] [--assets DIR]
                           [--workers N] [--gpus-per-worker G] [--dry-run [--gpu H100]] [--max-concurrent N] [--cluster-config YAML]
                           [--address ADDRESS] [--tracking {none,tensorboard,mlflow,wandb}] [--tracking-uri URI]
  python -m bench status NAME_OR_FILE [--smoke] [--where FIELD=VALUE] [--storage PATH_OR_URI] [--cache-dir DIR] [--assets DIR]
                           [--workers N] [--gpus-per-worker G]   (accepted so a sweep's command line works here too)
  python -m bench demo [--storage runs/demo] [--smoke]   (the embedded default: the demo sweep, then a summary)
  python -m bench upgrade-results STORAGE [--dry-run]   (results of an older schema version, rewritten under their current trial ids)
On a cluster started with ``ray up cluster.yaml`` submit the same command with ``ray job submit -- python -m bench ...``;
without a cluster a local Ray instance is started. Local paths may be relative to the current folder: they are made
absolute here, before anything reaches Ray. Every failure ends in exit status 2 and a last line ``error: ...``
naming the input and the problem (a listing, such as every trial that cannot run, comes above it;
``VARSWEEP_DEBUG=1`` shows the traceback too). Storage and cache folders are checked (created and probed with a
small file) before Ray is imported or any trial starts; a dry run creates nothing and imports neither Ray
nor peft, and Opacus only for a sweep with DP trials (its accountant calibrates their noise; torch is
imported either way, for the checks of checkpoints and data).

NAME_OR_FILE: a built-in sweep (``list`` shows them) or a sweep file, a path ending in .yaml, .yml or .toml
(``bench.sweep_file`` says what it holds; ``examples/`` has three). ``--workers`` and ``--gpus-per-worker`` replace
those fields of every trial's ``resources``, which no trial id includes, so the ids (and finished results) stay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import Parser, number, path_text, probe_folder, require_training_side, run_reporting
from .estimates import ASSUMED_UTILISATION, ESTIMATE_DEVICE, PEAK_FLOPS, check_gpu
from .preflight import SweepError
from .results import ResultStore, StorageError, check_storage_location, default_cache_dir
from .schema import ConfigError, is_uri, record_value, replace, with_absolute_paths
from .sweep_file import SUFFIXES, named_sweep
from .sweeps import SWEEPS, build_sweep, describe
from .sweeps.common import Assets


def _common(parser: argparse.ArgumentParser, storage: str) -> None:
    parser.add_argument(
        "name",
        metavar="NAME_OR_FILE",
        help=f"a built-in sweep ({', '.join(sorted(SWEEPS))}) or a sweep file ({', '.join(SUFFIXES)})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the sweep's smoke version: tiny base, offline data, CPU (a file's smoke: section on top)",
    )
    parser.add_argument(
        "--storage",
        default=storage,
        help="results and checkpoints: a local or shared path, or a URI (s3://...)",
    )
    parser.add_argument(
        "--assets",
        default=None,
        help="checkpoints/ and datasets/ of the paper sweeps (default: $VARSWEEP_ASSETS, else ./assets)",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="only the trials whose config has this value, e.g. method.name=lora (repeatable; as in python -m analysis)",
    )
    parser.add_argument(
        "--cache-dir",
        help="caches, including the checkpoints' SHA-256 that trial ids are made of (default: STORAGE/cache "
        "for a path, ~/.cache/varsweep for a URI; env VARSWEEP_CACHE)",
    )
    parser.add_argument(
        "--workers",
        type=number(int, minimum=1),
        help="DDP workers per trial, >= 1, in place of each trial's resources.workers (trial ids do not change)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=number(float, minimum=0),
        help="GPUs per worker, >= 0 (a fraction for single-worker trials only), in place of each trial's "
        "resources.gpus_per_worker (trial ids do not change)",
    )


def gpu_name(text: str) -> str:
    """An argparse ``type``: a GPU the dry run can price (``bench.estimates.check_gpu``)."""
    try:
        return check_gpu(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m bench", description="varsweep sweeps")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the sweeps and their sizes")
    sweep = commands.add_parser("sweep", help="run a sweep (relaunch to resume)")
    _common(sweep, "runs/sweeps")
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="check and print the grid, resources and estimated GPU hours; run and create nothing",
    )
    sweep.add_argument(
        "--gpu",
        type=gpu_name,
        default=ESTIMATE_DEVICE,
        help="the GPU the dry run prices hours on and the start order ranks trials by: that kind's measured "
        "rates, else another kind's scaled by the datasheet peaks, else "
        f"{ASSUMED_UTILISATION * 100:.0f}%% of its dense bf16 peak; one of {', '.join(PEAK_FLOPS)} "
        f"(any name holding one, e.g. 'NVIDIA H100 80GB HBM3'; default: {ESTIMATE_DEVICE})",
    )
    sweep.add_argument(
        "--max-concurrent",
        type=number(int, minimum=1),
        help="trials at once, >= 1 (default: as many as the cluster's resources fit)",
    )
    sweep.add_argument(
        "--address", help="Ray address (default: RAY_ADDRESS, a running cluster, else a new local Ray)"
    )
    sweep.add_argument(
        "--cluster-config",
        help="the autoscaler's cluster YAML whose node types and limits set how many trials run at once "
        "(default: the running cluster's own, e.g. ~/ray_bootstrap_config.yaml on a `ray up` head)",
    )
    from .tracking import TRACKERS

    sweep.add_argument(
        "--tracking",
        choices=TRACKERS,
        help="where each trial's config, metrics and artifacts are also logged (default: the sweep file's "
        "tracking:, else none)",
    )
    sweep.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI or W&B folder (default: under the storage, STORAGE/mlflow.db or STORAGE/wandb)",
    )
    status = commands.add_parser("status", help="which trials of a sweep have results (reads only)")
    _common(status, "runs/sweeps")
    demo = commands.add_parser(
        "demo", help="the embedded default: demo sweep on a local Ray, then its summary and checks"
    )
    demo.add_argument(
        "--storage",
        default="runs/demo",
        type=path_text,
        help="folder or URI for the demo's results, artifacts and analysis (default: runs/demo)",
    )
    demo.add_argument(
        "--smoke", action="store_true", help="a few steps only (CI): checks the pipeline, not the targets"
    )
    upgrade = commands.add_parser(
        "upgrade-results", help="rewrite the results of an older schema version under their current trial ids"
    )
    upgrade.add_argument(
        "storage", help="the sweep's storage (a path or URI; its results/ folder is rewritten)"
    )
    upgrade.add_argument(
        "--dry-run", action="store_true", help="list what would be rewritten; change nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_reporting(
        lambda: _run(_parser().parse_args(argv)),
        interrupted="interrupted; relaunch the same command to resume (finished trials are kept)",
    )


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        for name in sorted(SWEEPS):
            print(
                f"{name:<12} {len(build_sweep(name)):>3} trials ({len(build_sweep(name, smoke=True))} smoke)  {describe(name)}"
            )
        print("or a sweep file of your own: python -m bench sweep path/to/sweep.yaml (examples/ has three)")
        return 0
    if args.command == "demo":
        require_training_side()  # before the demo's storage is made
        from .demo import run_demo

        return run_demo(storage=args.storage, smoke=args.smoke)
    if args.command == "upgrade-results":
        return upgrade_results(args.storage, dry_run=args.dry_run)
    sweep = named_sweep(args.name, smoke=args.smoke, assets=Assets(args.assets))
    configs = [with_absolute_paths(c) for c in sweep.configs]
    configs = override_resources(configs, workers=args.workers, gpus_per_worker=args.gpus_per_worker)
    configs = select(configs, args.where, sweep=sweep.name)
    if sweep.source:
        size = f"{len(configs)} trial{'' if len(configs) == 1 else 's'}{' (smoke)' if args.smoke else ''}"
        about = f"; {sweep.description}" if sweep.description else ""
        print(f"sweep file {sweep.source}: {sweep.name}, {size}{about}")
    if args.command == "status":
        check_storage_location(args.storage, what="--storage")
        store = ResultStore(args.storage, create=False)
        store.require_folder()
        from .preflight import (
            identify,
        )  # trial ids follow the files' contents (hashes cached by the sweep, read only here)

        configs = identify(
            configs, cache_dir=args.cache_dir or default_cache_dir(args.storage), write=False, log=print
        )
        print("\n".join([status_table(configs, store), *status_notes(configs, store)]))
        return 0
    from .tracking import check_tracking

    tracking = args.tracking or sweep.tracking or "none"
    # a tracker whose package is missing is named before anything is created
    check_tracking(tracking, tracking_uri=args.tracking_uri)
    from .launcher import Launch, run_sweep

    # A bad storage or cache fails here, before Ray is imported or anything is built (``Launch`` checks them as
    # given); a dry run creates nothing, and neither does a run that an analysis-only install cannot start.
    cache_dir = args.cache_dir or default_cache_dir(args.storage)
    launch = Launch(
        storage=args.storage,
        cache_dir=cache_dir,
        max_concurrent=args.max_concurrent,
        address=args.address,
        cluster_config=args.cluster_config,
        tracking=tracking,
        tracking_uri=args.tracking_uri,
    )
    if args.dry_run and not is_uri(args.storage):
        check_folder(args.storage, what="--storage", create=False)
    else:
        require_training_side()
    ResultStore(args.storage, create=not args.dry_run)
    check_folder(cache_dir, what="--cache-dir" if args.cache_dir else "cache folder", create=not args.dry_run)
    summary = run_sweep(
        sweep.name + ("-smoke" if args.smoke else ""), configs, launch, dry_run=args.dry_run, gpu=args.gpu
    )
    if summary.get("unfinished"):  # stopped before every trial ended: a Ctrl-C that Tune caught
        raise KeyboardInterrupt
    return 1 if summary["failed"] else 0


def override_resources(configs: list, *, workers: int | None, gpus_per_worker: float | None) -> list:
    """The configs with ``resources.workers`` / ``resources.gpus_per_worker`` replaced where given (None keeps
    each trial's own). ``resources`` is not part of a trial id, so the ids stay; a combination the schema refuses
    (a fractional GPU per worker with several workers) is a ``ConfigError`` naming the options."""
    changes = {
        name: value
        for name, value in (("workers", workers), ("gpus_per_worker", gpus_per_worker))
        if value is not None
    }
    if not changes:
        return configs
    try:
        return [replace(c, resources=changes) for c in configs]
    except ConfigError as err:
        given = " ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in changes.items())
        raise ConfigError(f"{given}: {err}") from err


def select(configs: list, where: list[str], *, sweep: str) -> list:
    """The configs matching every ``FIELD=VALUE`` of ``where`` (dotted config paths, JSON values); none is an error."""
    from analysis.__main__ import parse_where
    from analysis.load import config_value

    wanted = parse_where(where)
    kept = [
        c for c in configs if all(config_value(c.to_dict(), path) == value for path, value in wanted.items())
    ]
    if not kept:
        raise SweepError(f"no trial of sweep {sweep} has {' and '.join(where)} ({len(configs)} trials)")
    return kept


def upgrade_results(storage: str, *, dry_run: bool = False) -> int:
    """Rewrite every result of an older schema version in ``storage`` (``ResultStore.upgrade_file``): one line per
    file, then the counts. 0 when every file is current (or, with ``dry_run``, could be made so), else 1."""
    store = ResultStore(storage, create=False)
    store.require_folder()
    counts: dict[str, int] = {}
    files, planned = store.files(), {}
    for path in files:
        outcome, line = store.upgrade_file(path, dry_run=dry_run, planned=planned if dry_run else None)
        counts[outcome] = counts.get(outcome, 0) + 1
        print(line)
    order = ("upgraded", "would upgrade", "current", "left")
    summary = ", ".join(f"{counts[o]} {'left alone' if o == 'left' else o}" for o in order if o in counts)
    total = (
        f"{summary} of {len(files)} files in {store.folder}"
        if files
        else f"no result files in {store.folder}"
    )
    print(total + (" (dry run: nothing changed)" if dry_run else ""))
    if counts.get("left"):  # every failing command ends on an "error:" line
        print(
            f"error: {counts['left']} file(s) left alone, each named above with why (not a result of this tool, "
            "damaged, or of a newer version)",
            file=sys.stderr,
        )
        return 1
    return 0


def check_folder(folder: str, *, what: str, create: bool) -> None:
    """A local folder the sweep writes to (the cache, a dry run's storage): not a file, nor under one; with ``create`` it is made and
    probed with a small file. ``StorageError`` names the folder and the problem. A dry run creates nothing."""
    if is_uri(folder):
        raise StorageError(f"{what} {folder}: must be a local or shared folder (a mounted path), not a URI")
    path = Path(folder).expanduser().absolute()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise StorageError(
                    f"{what} {folder}: {'is' if part == path else 'lies under'} a file{'' if part == path else f' ({part})'}, not a folder"
                )
            break
    if create:
        try:
            probe_folder(path)
        except OSError as err:
            raise StorageError(f"{what} {folder} is not writable: {err.strerror or err}") from err


def spent_epsilon(record: dict):
    """The epsilon a DP trial spent by the accountant that calibrated it (its reading is at most the target; the
    RDP reading of a PRV-calibrated trial is ~11% above it at epsilon 10 and read as an overrun), None without."""
    accountant = record_value(record, "privacy.calibration_accountant") or "rdp"
    return record_value(record, f"privacy.epsilon_{accountant}")


def status_table(configs, store: ResultStore) -> str:
    """One line per trial (finished with FID and epsilon, failed with its error's first line, invalid with the
    reason, pending), then the counts. Reads only."""
    # epsilon: spent, by the accountant that calibrated the trial
    lines = [f"{'trial':<44} {'id':<16} {'status':<8} {'FID':>8} {'epsilon':>8}  error"]
    counts: dict[str, int] = {}
    older = store.older_results()
    due = store.upgrades_due(older)  # shown at the trial they upgrade to
    for c in configs:
        state, detail = store.state(c.trial_id)
        if c.trial_id in due:
            state, detail = (
                "old",
                f"an older schema version's result, {Path(due[c.trial_id]).name}: run upgrade-results (below)",
            )
        counts[state] = counts.get(state, 0) + 1
        record = store.read(c.trial_id) if state in ("success", "failed") else None
        fid, eps = record_value(record or {}, "metrics.fid"), spent_epsilon(record or {})
        lines.append(
            f"{c.label:<44} {c.trial_id:<16} {state:<8} {_number(fid):>8} {_number(eps):>8}  {detail}".rstrip()
        )
    states = ("success", "failed", "invalid", "old", "newer", "pending")
    lines.append(", ".join(f"{counts[s]} {s}" for s in states if s in counts) + f" of {len(configs)} trials")
    if older:
        lines.append(
            f"{len(older)} result file(s) in {store.folder} have an older schema version: "
            f"`python -m bench upgrade-results {store.storage}` rewrites them under their current trial ids"
        )
    return "\n".join(lines)


def status_notes(configs, store: ResultStore) -> list[str]:
    """What the status table cannot show: asset paths not found on this machine (the trials reading them are
    identified by path instead of content, so a result their sweep wrote is not found: they show as pending) and
    the result files of trials not listed (another sweep's, or of trials identified differently)."""
    from .preflight import asset_paths

    notes = []
    missing = sorted({p for c in configs for p in asset_paths(c) if not Path(p).exists()})
    if missing:
        affected = sum(any(p in missing for p in asset_paths(c)) for c in configs)
        notes.append(
            f"warning: {len(missing)} asset path(s) not found here, e.g. {missing[0]}: the {affected} trial(s) "
            "reading them are identified by their paths, not the files' contents: a result written where the files "
            "were found is not matched, and its trial shows as pending; give the folder holding checkpoints/ and "
            "datasets/ with --assets DIR"
        )
    listed = {c.trial_id for c in configs}
    others = [path for path in store.files() if Path(path).stem not in listed]
    if others:
        notes.append(f"{len(others)} other result file(s) in {store.folder} are of trials not listed above")
    return notes


def _number(value) -> str:
    """Two decimals, or blank where a record holds no number (a failed trial's FID)."""
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


if __name__ == "__main__":
    sys.exit(main())
