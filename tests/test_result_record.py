"""The result record is typed (``bench.schema.RESULT_SECTIONS``): a renamed, missing or wrongly typed inner key is
refused naming its path; every key ``run_trial`` writes is defined; every analysis metric reads a defined key and
finds a number in a real record; analysis finds a real trial's artifacts from the storage root."""

from __future__ import annotations

import copy
import json
import typing

import pytest
from old_records import as_version
from sweep_driver import tiny_trial

from analysis.metrics import METRICS, lookup
from analysis.run import analyse
from bench.results import ResultStore
from bench.schema import (
    RESULT_SECTIONS,
    ConfigError,
    PrivacyConfig,
    RecordError,
    UnknownRecordPath,
    check_result,
    make_result,
    record_key_type,
    replace,
    upgrade_record,
)
from trainables.trial import run_trial

# Keys the typed record defines that no tiny CPU trial writes, and why.
NEVER_WRITTEN_HERE = {
    "cost.estimated": "only a record of dry-run estimates (analysis.paper.paper_fixture) sets it",
    "history.prior_kl": "only trials with method.prior_weight > 0",
    "evaluation_settings.classifier.resolution": "the older name of input_size",
    "evaluation_settings.sampling.cfg": "the older name of guidance_scale",
    "evaluation_settings.sampling.seed": "the older name of sampling_seed",
    "privacy.physical_batch_rows": "ledger versions 2 and 3 only (since 4 it is cost.rows_per_forward)",
    "evaluation_settings.sampling.compiled": "only trials with resources.compile_sampling (test_trial's DP trial)",
    "environment.earlier_git_commits": "only a resumed trial's (test_trial's resumed one)",
}
# Metrics that are no number on a CPU trial: MFU needs a GPU's peak FLOP rate.
NOT_A_NUMBER_ON_CPU = {"mfu"}


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """A storage folder with the results and artifacts of two tiny real trials (2 steps each): LoRA without DP
    (with a convergence curve and a 20-canary privacy audit) and LoRA with DP. About 30 s on 2 CPU cores, most of it building the shared caches."""
    root, cache = tmp_path_factory.mktemp("storage"), tmp_path_factory.mktemp("cache")
    plain = replace(
        tiny_trial("lora", steps=2),
        evaluation={"convergence_every_steps": 1, "convergence_num_images": 10},
        # the record's audit section: every key written by a real trial (at 1/N' no bound is possible: refused)
        audit={"canaries": 20, "delta": 1e-5},
    )
    dp = replace(
        tiny_trial("lora", steps=2),
        optimization={"batch_size": 256, "global_clip_norm": 2.0},
        privacy=PrivacyConfig(target_epsilon=2.0, sampling_rate=0.02, max_grad_norm=1.0).__dict__,
    )
    store = ResultStore(root)
    for config in (plain, dp):
        store.write(
            run_trial(
                config,
                cache_dir=cache,
                artifacts_dir=root / "artifacts" / config.trial_id,
                log=lambda line: None,
            )
        )
    return root


@pytest.fixture(scope="module")
def records(storage) -> dict[str, dict]:
    found = [json.loads(path.read_text()) for path in (storage / "results").glob("*.json")]
    return {("dp" if record["privacy"] else "plain"): record for record in found}


def _written_paths(value, path: str = "") -> set[str]:
    """Every dotted key path in a record's sections (list entries named by their list)."""
    if isinstance(value, list):
        return set().union(*(_written_paths(item, path) for item in value)) if value else set()
    if isinstance(value, dict):
        out = set()
        for key, item in value.items():
            name = f"{path}.{key}" if path else key
            out |= {name} | _written_paths(item, name)
        return out
    return set()


def _defined_paths(hint, path: str) -> set[str]:
    """Every dotted key path the typed record defines under ``path`` (open-ended mappings stop at their name)."""
    if typing.get_origin(hint) in (typing.Union, type(int | None)):
        return set().union(*(_defined_paths(option, path) for option in typing.get_args(hint)))
    if typing.get_origin(hint) is list:
        return _defined_paths(typing.get_args(hint)[0], path)
    if typing.is_typeddict(hint):
        out = set()
        for key, inner in typing.get_type_hints(hint).items():
            out |= {f"{path}.{key}"} | _defined_paths(inner, f"{path}.{key}")
        return out
    return set()


def test_real_records_validate_and_use_every_defined_key(records):
    written, defined = set(), set()
    for record in records.values():
        check_result(record)
        written |= _written_paths({name: record.get(name) for name in RESULT_SECTIONS if record.get(name)})
    for name, hint in RESULT_SECTIONS.items():
        defined |= {name} | _defined_paths(hint, name)
    dynamic = (
        "environment.packages.",
        "privacy.released_without_noise.",
        "privacy.accountants.",
    )  # open-ended mappings
    written = {path for path in written if not path.startswith(dynamic)}
    assert written <= defined  # check_result refuses undefined keys: this only restates it
    assert defined - written - {
        "upgraded_from",
        "upgraded_from.schema_version",
        "upgraded_from.trial_id",
    } == set(NEVER_WRITTEN_HERE)


def test_every_metric_source_is_defined_and_a_number_in_a_real_record(records):
    for metric in METRICS.values():
        hint = record_key_type(metric.source)
        assert {int, float} & set(typing.get_args(hint) or (hint,)), metric.source
        if metric.name in NOT_A_NUMBER_ON_CPU:
            continue
        value = lookup(records["dp"], metric.source)
        if not metric.source.startswith("privacy."):  # the ledger exists only with DP
            value = lookup(records["plain"], metric.source)
            assert (
                lookup(records["plain"], metric.source) is not None
                and lookup(records["dp"], metric.source) is not None
            )
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (metric.source, value)


def test_analysis_draws_a_real_trials_grid_from_the_storage_root(storage, records, tmp_path):
    analysis = analyse(storage, tmp_path / "out", figures=False)
    assert (
        set(analysis.grids) == {record["trial_id"] for record in records.values()}
        and not analysis.missing_grids
    )
    artifacts = records["plain"]["artifacts"]
    assert (
        artifacts["folder"] == f"artifacts/{records['plain']['trial_id']}"
        and (storage / artifacts["adapter"]).is_file()
    )
    assert all((storage / path).is_file() for entry in artifacts["real_images"] for path in entry["paths"])


def _record():
    config = tiny_trial("lora", steps=2)
    return make_result(
        config,
        status="success",
        metrics={"fid": 3.0, "precision": 0.5},
        cost={"train_pflops": 1e-6, "gpu_hours": 0.0},
        history=[{"step": 1, "seconds": 0.1, "lr": 1e-3, "loss": 4.2}],
    )


@pytest.mark.parametrize(
    "change, path",
    [
        (
            lambda r: r["cost"].update(train_pflop=r["cost"].pop("train_pflops")),
            "cost.train_pflop: not a key of cost",
        ),  # renamed
        (lambda r: r["cost"].update(train_pflops="1e-6"), "cost.train_pflops: expected number"),  # wrong type
        (
            lambda r: r["cost"].pop("train_pflops"),
            "cost.train_pflops: missing",
        ),  # missing from a recorded section
        (
            lambda r: r["metrics"].update(precision=True),
            "metrics.precision: expected number",
        ),  # a boolean is no number
        (lambda r: r["history"][0].update(loss=None), r"history\[\].loss: expected number"),
        (lambda r: r["history"][0].pop("lr"), r"history\[\].lr: missing"),
        (lambda r: r.update(metrics={"precision": 0.5}), "metrics.fid: missing"),  # partial, not empty
        (
            lambda r: r.update(
                data={"train_images": 10, "evaluation_images": 2, "classes": 2, "planned_steps": "2"}
            ),
            "data.planned_steps",
        ),
        (lambda r: r.update(privacy={"target_epsilon": 1.0}), "privacy.augmentation_multiplicity: missing"),
        (
            lambda r: r.update(
                artifacts={
                    "folder": "artifacts/x",
                    "adapter": None,
                    "generated_images": "/abs/images",
                    "real_images": [],
                }
            ),
            "artifacts: paths must be relative",
        ),
        (
            lambda r: r.update(
                artifacts={"generated_images": "images", "real_images": [{"label": 0, "paths": []}]}
            ),
            r"artifacts.real_images\[\].class: missing",
        ),
        (lambda r: r.update(extra=1), "extra: not a field of the result record"),
    ],
)
def test_a_bad_inner_key_is_refused_naming_its_path(change, path):
    record = _record()
    check_result(record)
    change(record)
    with pytest.raises(ConfigError, match=f"^{path}"):
        check_result(record)


def test_empty_sections_are_not_recorded_and_old_records_validate(records):
    failed = make_result(
        tiny_trial("lora"), status="failed", error="RuntimeError: boom"
    )  # every section empty
    assert failed["metrics"] == {} and failed["privacy"] is None
    old = copy.deepcopy(records["dp"])
    assert old["privacy"]["ledger_version"] == 4 and "physical_batch_rows" not in old["privacy"]
    old["evaluation_settings"]["sampling"] = {
        "cfg": 1.5,
        "top_k": 0,
        "top_p": 0.96,
        "batch_size": 20,
        "seed": 0,
        "autocast_bf16": True,
    }
    # Ledger versions 2 and 3 recorded the rows per forward (version 2 as physical_batch_size).
    for version, key in ((2, "physical_batch_size"), (3, "physical_batch_rows")):
        check_result({**old, "privacy": {**old["privacy"], "ledger_version": version, key: 32}})
    with pytest.raises(RecordError, match="privacy.physical_batch_size: not a key"):
        check_result({**old, "privacy": {**old["privacy"], "ledger_version": 3, "physical_batch_size": 32}})
    for name in ("plain", "dp"):
        for version in (1, 2):
            upgraded = upgrade_record(as_version(records[name], version))
            assert check_result(upgraded) and upgraded["config"] == records[name]["config"]


def test_a_successful_dp_record_accounts_every_planned_step(records):
    """A ledger short of its plan under-reports epsilon (a damaged checkpoint's step count resumed a run whose
    record said 2 of 4 steps, epsilon 1.84 for 1.99 spent): such a success is refused; a failure may stop early."""
    dp = records["dp"]
    assert dp["privacy"]["steps"] == dp["privacy"]["planned_steps"] == 2
    short = {**dp, "privacy": {**dp["privacy"], "steps": 1}}
    with pytest.raises(
        ConfigError, match=r"privacy\.steps: a successful DP trial accounts all its 2 planned steps"
    ):
        check_result(short)
    check_result({**short, "status": "failed", "error": "RuntimeError: killed"})


def test_lookup_refuses_undefined_keys_and_reads_absent_ones_as_none():
    record = _record()
    assert (
        lookup(record, "cost.train_pflops") == 1e-6 and lookup(record, "metrics.kid_mean") is None
    )  # not measured
    assert lookup(record, "privacy.epsilon_rdp") is None  # no ledger without DP
    for source, message in (
        ("cost.train_pflop", "'train_pflop' is not a key of cost"),
        ("metric.fid", "'metric' is not a section"),
        ("metrics.fid.value", "metrics.fid holds a number"),
    ):
        with pytest.raises(UnknownRecordPath, match=message):
            lookup(record, source)
