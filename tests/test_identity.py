"""Trial identity follows the files, not where they are mounted: content ids (checkpoint SHA-256, dataset content
ids) replace the paths in the trial id; they are computed once (sidecar or cache), dry runs create nothing, and a
trial refuses files that changed after its sweep was identified."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from old_records import as_version, version_2_schema
from PIL import Image
from sweep_driver import tiny_trial

from bench.preflight import SweepError, check_sweep, identify
from bench.schema import (
    ConfigError,
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    ModelConfig,
    OptimizationConfig,
    TrialConfig,
    replace,
    upgrade_record,
)
from bench.sweeps import SWEEPS, build_sweep
from bench.sweeps.common import unique
from trainables.assets import CONTENT_IDS_FILE, FileIds, verify_content
from trainables.models.checkpoints import SIDECAR_FORMAT, file_sha256
from trainables.trial import list_splits, run_trial

REPO = Path(__file__).resolve().parents[1]


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def make_assets(root: Path) -> Path:
    """Checkpoint and weights files (only their bytes matter to identity) and a two-class folder dataset."""
    (root / "checkpoints").mkdir(parents=True)
    for name, seed in (("var_d16.pth", 1), ("vae.pth", 2), ("inception.pth", 3)):
        (root / "checkpoints" / name).write_bytes(np.random.default_rng(seed).bytes(4096))
    seed = 10
    for split, count in (("train", 3), ("test", 2)):
        for label in ("a", "b"):
            for i in range(count):
                seed += 1
                png(root / "datasets" / "mine" / split / label / f"{i}.png", seed=seed)
    return root


def official_trial(root: Path, seed: int = 0) -> TrialConfig:
    checkpoints = root / "checkpoints"
    return TrialConfig(
        model=ModelConfig(
            base="official",
            depth=16,
            var_checkpoint=str(checkpoints / "var_d16.pth"),
            vqvae_checkpoint=str(checkpoints / "vae.pth"),
            tiny_pretraining_steps=0,
        ),
        data=DataConfig(dataset="folder", root=str(root / "datasets" / "mine"), resolution=256),
        method=MethodConfig(name="lora"),
        optimization=OptimizationConfig(steps=10, seed=seed),
        evaluation=EvaluationConfig(inception_weights=str(checkpoints / "inception.pth")),
    )


def later(path: Path) -> None:
    """Move a file's mtime a second on: a real replacement happens long after the first hash, and some file
    systems stamp mtimes at a coarse tick, so an edit within the test could otherwise keep the cached stamp."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def assets(tmp_path) -> Path:
    return make_assets(tmp_path / "mount-a")


def test_the_same_files_under_two_roots_give_the_same_trial_ids(assets, tmp_path):
    other = tmp_path / "elsewhere" / "mount-b"
    shutil.copytree(assets, other)
    first = identify([official_trial(assets, seed) for seed in range(2)], cache_dir=str(tmp_path / "cache"))
    second = identify([official_trial(other, seed) for seed in range(2)], cache_dir=str(tmp_path / "cache"))
    assert [c.trial_id for c in first] == [c.trial_id for c in second]
    assert first[0].trial_id != first[1].trial_id  # the seed still counts
    assert (
        official_trial(assets).trial_id != official_trial(other).trial_id
    )  # without content ids, paths decide
    # The paths stay in the config (provenance); the content ids sit beside them.
    assert second[0].model.var_checkpoint == str(other / "checkpoints" / "var_d16.pth")
    assert second[0].model.var_checkpoint_sha256 == file_sha256(other / "checkpoints" / "var_d16.pth")
    assert second[0].evaluation.inception_weights_sha256 == file_sha256(
        other / "checkpoints" / "inception.pth"
    )
    assert len(second[0].data.content_id) == 64
    assert TrialConfig.from_dict(json.loads(json.dumps(second[0].to_dict()))).trial_id == second[0].trial_id


def test_two_points_that_are_one_trial_are_refused_naming_their_paths(assets, tmp_path):
    """A copied dataset is the same trial: launched twice, the two would share one result and artifacts folder."""
    copy = tmp_path / "copy-of-mine"
    shutil.copytree(assets / "datasets" / "mine", copy)
    points = [official_trial(assets), replace(official_trial(assets), data={"root": str(copy)})]
    assert points[0].trial_id != points[1].trial_id
    cache = str(tmp_path / "cache")
    configs = identify(points, cache_dir=cache)
    with pytest.raises(SweepError) as caught:
        check_sweep(configs, cache_dir=cache)
    message = str(caught.value)
    assert f"2 points are one trial: they differ only in paths to the same content ({copy}, " in message
    assert str(assets / "datasets" / "mine") in message and configs[0].trial_id in message


def test_a_changed_byte_or_an_added_image_is_another_trial(assets, tmp_path):
    cache = str(tmp_path / "cache")
    before = identify([official_trial(assets)], cache_dir=cache)[0].trial_id
    checkpoint = assets / "checkpoints" / "var_d16.pth"
    data = bytearray(checkpoint.read_bytes())
    data[100] ^= 1
    checkpoint.write_bytes(bytes(data))
    later(checkpoint)
    changed = identify([official_trial(assets)], cache_dir=cache)[0].trial_id
    assert changed != before
    png(assets / "datasets" / "mine" / "train" / "a" / "new.png", seed=99)
    assert identify([official_trial(assets)], cache_dir=cache)[0].trial_id not in (before, changed)


def test_a_fresh_process_computes_the_same_ids(assets, tmp_path):
    here = [
        c.trial_id
        for c in identify(
            [official_trial(assets, seed) for seed in range(3)], cache_dir=str(tmp_path / "cache")
        )
    ]
    script = (
        "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_identity import official_trial; "
        "from bench.preflight import identify; "
        f"print(','.join(c.trial_id for c in identify([official_trial(Path({str(assets)!r}), s) for s in range(3)], "
        f"cache_dir={str(tmp_path / 'cache2')!r})))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(",") == here


def test_checkpoints_are_hashed_once_then_cached_and_a_dry_run_creates_nothing(assets, tmp_path):
    cache, said = tmp_path / "cache", []
    dry = identify([official_trial(assets)], cache_dir=str(cache), write=False, log=said.append)
    assert not cache.exists()  # a dry run hashes but writes no cache (nor the folder), and says so
    assert len(said) == 3 and all(
        ", not kept (this command writes no cache; a sweep keeps it)" in s for s in said
    )
    real = identify([official_trial(assets)], cache_dir=str(cache), log=said.append)
    assert len(said) == 6 and all("GiB), once: its SHA-256 identifies" in s for s in said[3:])
    assert real[0].trial_id == dry[0].trial_id
    record = json.loads((cache / CONTENT_IDS_FILE).read_text())
    checkpoint = str(assets / "checkpoints" / "var_d16.pth")
    assert record["files"][checkpoint]["sha256"] == file_sha256(checkpoint) and len(record["files"]) == 3
    # The cache is what answers while (path, size, mtime) hold: a planted entry is believed ...
    record["files"][checkpoint]["sha256"] = "ab" * 32
    (cache / CONTENT_IDS_FILE).write_text(json.dumps(record))
    assert (
        identify([official_trial(assets)], cache_dir=str(cache))[0].model.var_checkpoint_sha256 == "ab" * 32
    )
    later(Path(checkpoint))  # ... and a newer file is hashed again
    assert identify([official_trial(assets)], cache_dir=str(cache))[
        0
    ].model.var_checkpoint_sha256 == file_sha256(checkpoint)


def test_a_sidecar_names_the_checkpoint_without_hashing(assets, tmp_path):
    checkpoint = assets / "checkpoints" / "vae.pth"
    Path(f"{checkpoint}.json").write_text(
        json.dumps({"format": SIDECAR_FORMAT, "kind": "vqvae", "sha256": "cd" * 32})
    )
    config = identify([official_trial(assets)], cache_dir=str(tmp_path / "cache"))[0]
    assert config.model.vqvae_checkpoint_sha256 == "cd" * 32
    assert str(checkpoint) not in json.loads((tmp_path / "cache" / CONTENT_IDS_FILE).read_text())["files"]


def test_missing_files_keep_their_paths_in_the_id_and_do_not_raise(assets, tmp_path):
    (assets / "checkpoints" / "inception.pth").unlink()
    (assets / "datasets" / "mine" / "test" / "b" / "0.png").unlink()
    shutil.rmtree(assets / "datasets" / "mine" / "train")
    config = identify([official_trial(assets)], cache_dir=str(tmp_path / "cache"))[0]
    assert config.evaluation.inception_weights_sha256 is None and config.data.content_id is None
    assert config.model.var_checkpoint_sha256 is not None


def test_a_checkpoint_replaced_after_identification_is_refused(assets, tmp_path, monkeypatch):
    config = identify([official_trial(assets)], cache_dir=str(tmp_path / "cache"))[0]
    splits = list_splits(config, tmp_path / "cache")
    with (
        monkeypatch.context() as patched
    ):  # each trial reuses the driver's cached hashes: no checkpoint is read again
        patched.setattr("trainables.assets.file_sha256", lambda path: pytest.fail(f"hashed {path} again"))
        verify_content(config, splits=splits, files=FileIds(tmp_path / "cache", write=False))
    verify_content(
        config, splits=splits, files=FileIds(tmp_path / "no-cache", write=False)
    )  # unchanged files pass
    (assets / "checkpoints" / "var_d16.pth").write_bytes(b"other weights")
    with pytest.raises(ConfigError, match=r"model\.var_checkpoint: .*var_d16\.pth .*replaced"):
        verify_content(config, splits=splits, files=FileIds(tmp_path / "no-cache", write=False))
    # With a sidecar, the sidecar's SHA-256 is compared (the loader then checks the file against it).
    fresh = identify([official_trial(assets)], cache_dir=str(tmp_path / "cache2"))[0]
    Path(f"{assets / 'checkpoints' / 'vae.pth'}.json").write_text(
        json.dumps({"format": SIDECAR_FORMAT, "sha256": "ef" * 32})
    )
    with pytest.raises(ConfigError, match=r"model\.vqvae_checkpoint: .*vae\.pth"):
        verify_content(fresh, splits=splits, files=FileIds(tmp_path / "no-cache", write=False))


def test_run_trial_refuses_images_added_after_identification(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "test"):
        for label in ("a", "b"):
            for i in range(2):
                png(root / split / label / f"{i}.png", seed=i)
    config = replace(
        tiny_trial("lora"),
        data={"dataset": "folder", "root": str(root), "resolution": 16},
        optimization={"batch_size": 4},  # the 4 training images
    )
    identified = identify([config], cache_dir=str(tmp_path / "cache"))[0]
    assert identified.data.content_id is not None and identified.trial_id != config.trial_id
    png(root / "train" / "a" / "late.png", seed=7)
    with pytest.raises(ConfigError, match=r"data\.root: .*changed after the sweep was launched"):
        run_trial(
            identified,
            cache_dir=tmp_path / "cache",
            artifacts_dir=tmp_path / "artifacts",
            log=lambda line: None,
        )
    assert (
        not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()
    )  # refused before any model was built


# Digests of every smoke sweep's trial ids (and the tiny demo's) at schema version 3 (integers in float fields became
# floats and the DP rows per forward left the privacy section, which changed ids once; results of versions 1 and 2
# are upgraded to these ids by `bench upgrade-results`, see the last test). Later changes must leave them
# unchanged, so results keep being skipped on relaunch; a deliberate change bumps SCHEMA_VERSION, or changes what
# the trials measure. Twice so far, each undone below to show that nothing else moved the ids:
# - 2026-12-07, digits-cnn-v2 replaced digits-cnn-v1 (trained on the digits train split, a DP trial's private data),
#   so every digits trial is a new one and results scored with v1 are not taken for its
#   (``SMOKE_IDS_WITH_DIGITS_CNN_V1``);
# - 2026-12-07, smoke versions took their paper trials' routes: top-k at the trial's share of the codebook (it was
#   off), a spread point's k of 6 (Table 2's k = 32 and k = 128 smoke versions were one trial, k = 4) and the
#   trial's view seed (``SMOKE_IDS_BEFORE_SMOKE_ROUTES``; the demo's trials are its own, unchanged);
# - 2026-12-07, a paper trial's seed seeds its evaluation's sampling too (the second seed sampled with seed 0), and a
#   smoke version keeps it (``SMOKE_IDS_BEFORE_SEEDED_SAMPLING``: only the second seed's moved);
# - 2026-12-07, DP paper trials calibrate sigma with PRV up to epsilon 100 (Opacus's default), RDP above, and their
#   smoke versions keep the accountant (``SMOKE_IDS_BEFORE_PRV_CALIBRATION``);
# - 2026-12-07, Table 1's seed-0 runs of the convergence sweep's cells record its curves, so the two sweeps share
#   those trials (``SMOKE_IDS_BEFORE_SHARED_CONVERGENCE``: Table 1's and 9's moved, the convergence sweep's not).
SMOKE_IDS_BEFORE = {
    ("convergence", True): "063349bc88c5eb95",
    ("demo", False): "a675569d3820406a",
    ("demo", True): "d95b09ea128dbe55",
    ("privacy_audit", True): "816969b2a147c0a6",
    ("second_seed", True): "42379f74619d6a70",
    ("table1", True): "bb7848bc5be4dba2",
    ("table10", True): "3df54c71c17ee7ae",
    ("table2", True): "42f962b6be6f76bf",
    ("table3", True): "a3ce78ca33cc6643",
    ("table9", True): "bb7848bc5be4dba2",
}
SMOKE_IDS_BEFORE_SHARED_CONVERGENCE = SMOKE_IDS_BEFORE | {
    ("table1", True): "4199ccb8f95c3fff",
    ("table9", True): "4199ccb8f95c3fff",
}
SMOKE_IDS_BEFORE_PRV_CALIBRATION = SMOKE_IDS_BEFORE_SHARED_CONVERGENCE | {
    ("privacy_audit", True): "1686f51031e689a8",
    ("table10", True): "73a7cefc91eab2d1",
    ("table2", True): "295c21cec9151e18",
    ("table3", True): "59fb2db7a4ff140d",
}
SMOKE_IDS_BEFORE_SEEDED_SAMPLING = SMOKE_IDS_BEFORE_PRV_CALIBRATION | {
    ("second_seed", True): "ce377575001e769c"
}
SMOKE_IDS_BEFORE_SMOKE_ROUTES = {
    ("convergence", True): "492b52a1888d4445",
    ("demo", False): "a675569d3820406a",
    ("demo", True): "d95b09ea128dbe55",
    ("privacy_audit", True): "91189b8d793269d9",
    ("second_seed", True): "7b09dab6f769f4a4",
    ("table1", True): "8e25b44d44b47c1b",
    ("table10", True): "19812a236ecb317d",
    ("table2", True): "cd901b9181037d45",
    ("table3", True): "b90df1a79b99e73e",
    ("table9", True): "8e25b44d44b47c1b",
}
SMOKE_IDS_WITH_DIGITS_CNN_V1 = {
    ("convergence", True): "68a0e2dec8d7ce6c",
    ("demo", False): "6ca375a82a4b34f8",
    ("demo", True): "3de367dd90c816b1",
    ("privacy_audit", True): "388236ebc8bb7b6b",
    ("second_seed", True): "8df401d65192d9cb",
    ("table1", True): "0950a829f9cc3c9e",
    ("table10", True): "ed3386e70bfa3f02",
    ("table2", True): "e47baa8e4ad9e445",
    ("table3", True): "ab0b0fae3fbcd6b8",
    ("table9", True): "0950a829f9cc3c9e",
}


def _digest(configs: list[TrialConfig]) -> str:
    return hashlib.sha256(",".join(c.trial_id for c in unique(configs)).encode()).hexdigest()[:16]


def _before_shared_convergence(config: TrialConfig, *, sweep: str) -> TrialConfig:
    """A trial as sweeps made it before Table 1's seed-0 runs recorded the convergence curves: none in Table 1's."""
    if sweep in ("table1", "table9") and config.evaluation.convergence_every_steps:
        return replace(config, evaluation={"convergence_every_steps": 0})
    return config


def _before_prv_calibration(config: TrialConfig, *, sweep: str) -> TrialConfig:
    """A trial as sweeps made it before DP paper trials calibrated with PRV: every one with RDP (and no shared
    convergence)."""
    config = _before_shared_convergence(config, sweep=sweep)
    return config if config.privacy is None else replace(config, privacy={"accountant": "rdp"})


def _before_seeded_sampling(config: TrialConfig, *, sweep: str) -> TrialConfig:
    """A trial as sweeps made it before its seed seeded its evaluation's sampling: sampling seed 0 (and RDP)."""
    return replace(_before_prv_calibration(config, sweep=sweep), evaluation={"sampling_seed": 0})


def _before_smoke_routes(config: TrialConfig, *, sweep: str) -> TrialConfig:
    """A smoke trial as smoke versions made it before they took their paper trials' routes: no top-k, k = 4 where
    it is now a spread point's 6, crops of view seed 0 (and, as then, sampling seed 0)."""
    config = _before_seeded_sampling(config, sweep=sweep)
    changes: dict[str, dict] = {"evaluation": {"top_k": 0}, "data": {"view_seed": 0}}
    if config.privacy is not None and config.privacy.augmentation_multiplicity == 6:
        changes["privacy"] = {"augmentation_multiplicity": 4}
        changes["data"]["cached_views"] = 4
    return replace(config, **changes)


# Each change to the smoke ids, newest first: the digests before it, and how a config is taken back to then.
UNDONE = {
    "shared convergence": (SMOKE_IDS_BEFORE_SHARED_CONVERGENCE, _before_shared_convergence),
    "PRV calibration": (SMOKE_IDS_BEFORE_PRV_CALIBRATION, _before_prv_calibration),
    "seeded sampling": (SMOKE_IDS_BEFORE_SEEDED_SAMPLING, _before_seeded_sampling),
    "smoke routes": (SMOKE_IDS_BEFORE_SMOKE_ROUTES, _before_smoke_routes),
}


@pytest.mark.parametrize("change", list(UNDONE))
def test_only_each_change_moved_the_smoke_ids(change):
    digests, undo = UNDONE[change]
    for (name, smoke), digest in digests.items():
        assert _digest([undo(c, sweep=name) for c in build_sweep(name, smoke=smoke)]) == digest, name


def test_only_the_retired_classifier_changed_the_ids():
    """Each sweep scored with digits-cnn-v1 again (and its smoke routes undone) has the ids it had before v2:
    nothing else moved them."""
    for (name, smoke), digest in SMOKE_IDS_WITH_DIGITS_CNN_V1.items():
        configs = [
            replace(_before_smoke_routes(c, sweep=name), evaluation={"extractor": "digits-cnn-v1"})
            for c in build_sweep(name, smoke=smoke)
        ]
        assert _digest(configs) == digest, name


@pytest.mark.parametrize("name, smoke", sorted(SMOKE_IDS_BEFORE))
def test_tiny_and_offline_trial_ids_are_unchanged(name, smoke, tmp_path):
    configs = build_sweep(name, smoke=smoke)
    assert all(c.model.base == "tiny" and c.data.root is None for c in configs)
    identified = identify(configs, cache_dir=str(tmp_path / "cache"))
    assert [c.trial_id for c in identified] == [c.trial_id for c in configs] and not (
        tmp_path / "cache"
    ).exists()
    assert _digest(configs) == SMOKE_IDS_BEFORE[(name, smoke)]


def test_every_smoke_sweep_is_checked():
    assert {name for name, _ in SMOKE_IDS_BEFORE} == set(SWEEPS)


def test_version_2_results_of_every_built_in_trial_upgrade_to_its_id(tmp_path):
    """Every built-in sweep, smoke and full: the config as version 2 wrote it (validated by that schema, under the
    id it gave) upgrades to this schema's config and id, so `bench upgrade-results` finds every finished trial."""
    before = version_2_schema(tmp_path)
    assert before.SCHEMA_VERSION == 2
    compared, changed = 0, 0
    for name in SWEEPS:
        for smoke in (True, False):
            for config in build_sweep(name, smoke=smoke):
                old = as_version({"config": config.to_dict(), "trial_id": config.trial_id}, 2)
                old["trial_id"] = before.TrialConfig.from_dict(old["config"]).trial_id
                upgraded = upgrade_record(old)
                assert upgraded["trial_id"] == config.trial_id, config.label
                expected = config.to_dict()
                if config.privacy is not None:
                    # Version 2 put whole examples through a forward (at least one, all k views): the upgraded
                    # record says what ran, though this schema would spread them (k = 128 at 32 rows).
                    k, rows = config.privacy.augmentation_multiplicity, config.resources.rows_per_forward
                    expected["resources"]["rows_per_forward"] = max(1, rows // k) * k
                assert upgraded["config"] == expected, config.label
                compared, changed = compared + 1, changed + (old["trial_id"] != config.trial_id)
    assert compared > 100 and changed > 50
