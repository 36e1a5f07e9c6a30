"""A trial's plan, from its config and its dataset's listing alone (no model, no Ray, no Opacus unless the trial
is DP): the real split sizes, the planned steps, the convergence steps and, under DP, delta and the noise
multiplier. The driver's preflight (``bench.preflight``, also in ``--dry-run``) and every trial use the same
``plan_trial``, so a trial takes what the driver checked."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.schema import MIN_EVALUATION_IMAGES, AuditConfig, ConfigError, TrialConfig

from .audit import included_count, inclusion_mask
from .audit_bound import epsilon_lower_bound
from .data import offline
from .data.datasets import (
    DatasetError,
    ImageList,
    MissingRootError,
    UnknownSplitError,
    byte_identical,
    check_images,
    read_dataset,
    spellings,
)

# The smallest delta an audit's refusal looks at for a bound: below it an audit would not be read anyway.
AUDIT_DELTA_FLOOR = 1e-12


@dataclass(frozen=True)
class TrialPlan:
    """What the cheap checks found and what the trial then does: the real split sizes, the steps it will take,
    the convergence curve's steps (steps done; empty without one) and under DP the resolved delta and the sigma
    that spends the budget over ``planned_steps``. With an audit the trial trains on ``train_images`` +
    ``canaries_included`` examples, and steps, delta and sigma are planned for that count (``examples``). ``run_trial`` uses it as is: nothing here is computed twice.
    Every rank of a DDP trial lists the same files, so their plans are equal."""

    train_images: int
    evaluation_images: int
    classes: int
    planned_steps: int
    evaluation_steps: tuple[int, ...] = ()
    delta: float | None = None
    noise_multiplier: float | None = None
    canaries_included: int = 0  # an audit's canaries that train beside the real split (``trainables.audit``)
    # The delta of an audit's bound: the DP trial's own; without DP ``audit.delta``, else 1/N' (the delta a DP
    # trial on the same data resolves). None without an audit.
    audit_delta: float | None = None
    splits: tuple[ImageList, ImageList] | None = field(
        default=None, repr=False, compare=False
    )  # (train, evaluation) as listed

    @property
    def examples(self) -> int:
        """N' = the real training images plus the included canaries: the dataset the mechanism runs on."""
        return self.train_images + self.canaries_included


def data_root(config: TrialConfig, cache_dir: str | Path) -> Path:
    """The dataset's folder; offline sets are written (once) under the cache folder."""
    if config.data.root is not None:
        return Path(config.data.root)
    return offline.write_folder(
        config.data.dataset, Path(cache_dir) / "offline-data", image_size=config.data.resolution
    )


def _reader_name(config: TrialConfig) -> str:
    return "folder" if config.data.root is None else config.data.dataset


def list_splits(
    config: TrialConfig, cache_dir: str | Path, *, write: bool = True
) -> tuple[ImageList, ImageList]:
    """(training, evaluation) split listings. ``write=False`` lists an offline set that is not written yet from
    its generator, creating nothing (a dry run)."""
    splits = (config.data.train_split, config.data.evaluation_split)
    d = config.data
    if not write and d.root is None:
        root = Path(cache_dir) / "offline-data"
        if not (offline.folder_path(d.dataset, root, image_size=d.resolution) / "complete").is_file():
            listed = [offline.listing(d.dataset, root, split, image_size=d.resolution) for split in splits]
            return tuple(
                ImageList(
                    "folder", split, tuple(p for p, _ in files), tuple(label for _, label in files), names
                )
                for split, (files, names) in zip(splits, listed)
            )
    root = data_root(config, cache_dir)
    listed = []
    for named, split in zip(("data.train_split", "data.evaluation_split"), splits, strict=True):
        try:
            listed.append(read_dataset(_reader_name(config), root, split))
        except UnknownSplitError as err:  # the fields the user wrote, not only "data"
            raise UnknownSplitError(f"{named}: {err}") from err
        except MissingRootError as err:
            raise MissingRootError(f"data.root: {err}") from err
    return tuple(listed)


def preflight(config: TrialConfig, cache_dir: str | Path, *, write: bool = True) -> TrialPlan:
    """The checks each trial repeats cheaply before it loads anything: checkpoint and weight files exist, the
    dataset lists its splits, then ``plan_trial``. Raises ``ConfigError`` or ``DatasetError``/``PrivacyConfigError``
    naming the problem. ``write=False`` creates nothing (a dry run). The driver's ``bench.preflight.check_sweep``
    reads more (checkpoint headers, every listed image, the Inception weights), once per sweep."""
    for field_name in ("var_checkpoint", "vqvae_checkpoint"):
        path = getattr(config.model, field_name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"model.{field_name}: no file at {path}")
    weights = config.evaluation.inception_weights
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"evaluation.inception_weights: no file at {weights}")
    return plan_trial(config, list_splits(config, cache_dir, write=write))


def _class_difference(train: ImageList, evaluation: ImageList) -> str:
    a, b = set(train.class_names), set(evaluation.class_names)

    def named(names: set[str]) -> str:
        return ", ".join(sorted(names)[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    parts = [
        f"only in {split.split}: {named(only)}"
        for split, only in ((train, a - b), (evaluation, b - a))
        if only
    ]
    return f"the {train.split} and {evaluation.split} splits have different classes ({'; '.join(parts) or 'the same names in another order'})"


def _check_disjoint(train: ImageList, evaluation: ImageList) -> None:
    """Refuse an image listed in both splits (an edited annotation file): the metrics would compare the model with
    images it trained on. The same split chosen for both is the caller's choice and passes."""
    if train.split == evaluation.split:
        return
    trained, scored = spellings(train.paths), spellings(evaluation.paths)
    shared = sorted(
        " = ".join(sorted({*trained[file], *scored[file]})) for file in trained.keys() & scored.keys()
    )
    if shared:
        raise ConfigError(
            f"data.dataset: {len(shared)} image(s) of {train.name} are in both the {train.split} and the "
            f"{evaluation.split} split ({', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''}): the "
            "evaluation would score the model against images it trained on; fix the split files"
        )


def _check_every_scored_class_trains(train: ImageList, evaluation: ImageList) -> None:
    """Refuse a class the evaluation scores but the training split has no image of (the named datasets take their
    classes from annotation files, so an edited or partial split can empty one): the evaluation would generate
    it from a class embedding no step trained and count those images in the FID."""
    trained, scored = train.class_counts, evaluation.class_counts
    untrained = [name for name, count in scored.items() if count and not trained[name]]
    if untrained:
        raise ConfigError(
            f"data.dataset: {len(untrained)} class(es) of {train.name} have images in the {evaluation.split} "
            f"split but none in the {train.split} split ({', '.join(untrained[:3])}"
            f"{' ...' if len(untrained) > 3 else ''}): the evaluation would score classes the model never trained "
            "on; fix the split files"
        )


def _perfect_guess_bound(audit: AuditConfig, *, delta: float) -> float:
    """The epsilon lower bound (nats) an audit would report had its attack told every included canary from every
    excluded one: the most this audit can ever show at ``delta``."""
    included_M = inclusion_mask(audit)
    # Every member above every non-member, and no two scores equal: the bound abstains on ties, so scores of
    # only 1 and 0 would allow fewer guesses than a perfect attack makes.
    scores_M = included_M * audit.canaries + np.arange(audit.canaries)
    return epsilon_lower_bound(scores_M.astype(float), included_M, delta=delta, confidence=audit.confidence)[
        "epsilon_lower_bound"
    ]


def _largest_boundable_delta(audit: AuditConfig, *, below: float) -> float:
    """The largest delta under ``below`` (which gives no bound) at which a perfect attack gives a bound, to two
    digits: bisected in log delta, as the bound falls when delta grows."""
    smallest, largest = AUDIT_DELTA_FLOOR, below
    for _ in range(40):
        middle = math.sqrt(smallest * largest)
        smallest, largest = (
            (middle, largest) if _perfect_guess_bound(audit, delta=middle) > 0 else (smallest, middle)
        )
    # Rounded down: rounded up, the delta named could be past the threshold and give 0 again.
    scale = 10.0 ** (math.floor(math.log10(smallest)) - 1)
    return math.floor(smallest / scale) * scale


def _check_audit_can_bound(config: TrialConfig, *, delta: float) -> None:
    """Refuse an audit whose bound is 0 whatever the attack finds (delta above ~2.6e-4 at 95% for 100 canaries or
    more, e.g. 256 canaries at delta = 1/N' on Flowers): it would train and record 0, read as "no leak found"."""
    audit = config.audit
    if _perfect_guess_bound(audit, delta=delta) > 0:
        return
    where = "privacy.delta" if config.privacy is not None else "audit.delta"
    prefix = f"audit: with {audit.canaries} canaries at delta {delta:.3g} even an attack that tells every canary apart"
    if _perfect_guess_bound(audit, delta=AUDIT_DELTA_FLOOR) == 0:
        raise ConfigError(
            f"{prefix} gives an epsilon lower bound of 0, and still does at delta {AUDIT_DELTA_FLOOR:g}: raise "
            "audit.canaries (or lower audit.confidence)"
        )
    rounded = _largest_boundable_delta(audit, below=delta)
    tenth = _perfect_guess_bound(audit, delta=rounded / 10)
    # More canaries do not help here: the guesses grow with them, and the threshold stays near 2.6e-4 at 95%.
    raise ConfigError(
        f"{prefix} gives an epsilon lower bound of 0: the one-run bound's delta term outweighs its significance "
        f"at any scores. Set {where} to {rounded:.2g} or less (the smaller, the higher the bound can go: "
        f"{tenth:.2f} at {rounded / 10:.2g})"
    )


def _check_evaluation_size(config: TrialConfig, evaluation: ImageList) -> None:
    """Refuse an evaluation split with fewer than ``MIN_EVALUATION_IMAGES`` images."""
    if len(evaluation) < MIN_EVALUATION_IMAGES:
        # The generated images are scored against every real one: precision/recall (k=3) needs 4 real images,
        # whatever evaluation.num_images says, and would otherwise fail only after training and generation.
        raise ConfigError(
            f"data.dataset: {config.data.dataset}'s {evaluation.split} split (data.evaluation_split) has "
            f"{len(evaluation)} image(s), fewer than the {MIN_EVALUATION_IMAGES} an evaluation needs: add images "
            "or choose another split"
        )


def _check_warmup(config: TrialConfig, *, steps: int, examples: int) -> None:
    """A run given in epochs must not end inside its warm-up (one given in steps: ``check_launchable``)."""
    warmup = config.optimization.warmup_steps
    if config.method.name != "base" and warmup > steps:
        raise ConfigError(
            f"optimization.warmup_steps: {warmup} is more than the run's {steps} steps "
            f"({config.optimization.epochs} epochs of {examples} training examples): it would never reach its "
            "learning rate; lower warmup_steps or raise epochs"
        )


def image_problems(
    configs: list[TrialConfig], cache_dir: str | Path, *, write: bool = True, log=None
) -> dict[str, list[TrialConfig]]:
    """{problem: the trials it stops} after ``check_images`` of the train and evaluation splits of every dataset
    the trials read, each decoded once: an unreadable image stops every trial of its dataset that does not skip
    them; where images are skipped, each trial is planned again for those it will train on and score (the
    listings' plan counted them), and one left unable to run is named. ``write=False`` (a dry run) keeps no
    outcome in the cache and leaves out the offline sets it has not written (generated here: nothing to decode).
    """
    checked: dict[tuple, list | str] = {}
    copies: dict[tuple, dict[str, str | None]] = {}
    problems: dict[str, list[TrialConfig]] = {}
    for config in configs:
        d = config.data
        if not write and d.root is None:
            continue
        key = (d.dataset, d.root, d.train_split, d.evaluation_split, d.resolution, d.skip_corrupt_images)
        if key not in checked:
            try:
                checked[key] = [
                    check_images(
                        split,
                        skip_corrupt=d.skip_corrupt_images,
                        cache_dir=cache_dir if write else None,
                        log=log,
                    )
                    for split in list_splits(config, cache_dir, write=write)
                ]
            except DatasetError as err:
                checked[key] = str(err)
        outcome = checked[key]
        if isinstance(outcome, str):
            problems.setdefault(outcome, []).append(config)
            continue
        if key not in copies:
            copies[key] = _copied_images(
                *(split for split, _ in outcome), cache_dir=cache_dir if write else None
            )
        refusal = copies[key]["dp" if config.privacy is not None else "any"]
        if refusal is not None:
            problems.setdefault(refusal, []).append(config)
            continue
        skipped = sum(len(dropped) for _, dropped in outcome)
        try:
            if skipped:
                plan_trial(config, tuple(split for split, _ in outcome))
        except ValueError as err:  # ConfigError, DatasetError, PrivacyConfigError
            problems.setdefault(f"{skipped} unreadable image(s) skipped: {err}", []).append(config)
    return problems


def _copied_images(
    train: ImageList, evaluation: ImageList, *, cache_dir: str | Path | None
) -> dict[str, str | None]:
    """Why a trial on a ``folder`` dataset (your own images) cannot run, where a file is a byte-identical copy (or
    hard link) of another: {"dp": refusal of a DP trial, "any": of every trial}. In the training split each copy
    was an example of its own, so under DP the guarantee covered one copy, not the picture (without DP a copy only
    weighs the picture double, as oversampling does on purpose); across the splits the evaluation scored the model
    against images it trained on. ``spellings`` catches the same file listed twice, not copies. The named datasets'
    splits are taken as their publishers made them. One read of every file, kept in the cache
    (``content_digests``); a file that cannot be read is the refusal."""
    if train.name != "folder":
        return {"dp": None, "any": None}
    try:
        within = byte_identical(train, cache_dir=cache_dir)
        across = (
            [] if train.split == evaluation.split else byte_identical(train, evaluation, cache_dir=cache_dir)
        )
    except DatasetError as err:
        return {"dp": str(err), "any": str(err)}
    refusals: dict[str, str | None] = {"dp": None, "any": None}
    if across:
        refusals["any"] = refusals["dp"] = (
            f"{train.name}: {len(across)} image(s) of the {evaluation.split} split are byte-identical copies of "
            f"{train.split} images ({_few(across)}): the evaluation would score the model against images it trained "
            f"on; delete the copies (or, to score on the training images, set data.evaluation_split: {train.split})"
        )
    elif within:
        refusals["dp"] = (
            f"{train.name} {train.split}: {len(within)} image(s) have byte-identical copies in the split "
            f"({_few(within)}): under DP each copy is an example of its own, and the guarantee covers one copy, not "
            "the picture; delete the copies"
        )
    return refusals


def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")


def plan_trial(config: TrialConfig, splits: tuple[ImageList, ImageList]) -> TrialPlan:
    """What the trial will do with these split listings: the evaluation split's classes are the training split's
    and it has the ``MIN_EVALUATION_IMAGES`` an evaluation scores at least, the planned steps, the convergence
    steps, and under DP the checks that need N (delta vs 1/N, a reachable budget) and the noise multiplier (no
    files are read; the driver's ``bench.preflight`` and every trial use this)."""
    config.check_launchable()
    train, evaluation = splits
    if train.class_names != evaluation.class_names:
        raise ConfigError(f"data.dataset: {_class_difference(train, evaluation)}")
    _check_disjoint(train, evaluation)
    _check_every_scored_class_trains(train, evaluation)
    # An audit's included canaries train like any example: the steps, Poisson sampling and delta count them.
    canaries = included_count(config.audit)
    examples = len(train) + canaries
    batch = config.optimization.batch_size
    if config.privacy is None and config.method.name != "base" and batch > examples:
        raise ConfigError(
            f"optimization.batch_size: {batch} is more than the {examples} training examples of {train.name} "
            f"{train.split}; a step cannot draw more (its epochs would be miscounted): set batch_size <= {examples}"
        )
    steps, p = config.planned_steps(examples), config.privacy
    _check_warmup(config, steps=steps, examples=examples)
    curve = config.convergence_steps(steps)
    delta = sigma = None
    if p is not None:
        # Imported here: the accountant is Opacus's, and a dry run of a sweep without DP imports no Opacus.
        from .privacy import calibrate_noise_multiplier, validate_privacy

        delta = validate_privacy(p, dataset_size=examples, planned_steps=steps)
    audit_delta = None if config.audit is None else (delta or config.audit.delta or 1.0 / examples)
    if audit_delta is not None:
        _check_audit_can_bound(config, delta=audit_delta)
    _check_evaluation_size(config, evaluation)  # before the calibration: seconds at a large epsilon
    if p is not None:
        sigma = calibrate_noise_multiplier(
            target_epsilon=p.target_epsilon,
            delta=delta,
            sampling_rate=p.sampling_rate,
            steps=steps,
            accountant=p.accountant,
        )
    return TrialPlan(
        len(train),
        len(evaluation),
        len(train.class_names),
        steps,
        evaluation_steps=curve,
        delta=delta,
        noise_multiplier=sigma,
        canaries_included=canaries,
        audit_delta=audit_delta,
        splits=(train, evaluation),
    )
