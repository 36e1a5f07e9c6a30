"""Sweeps from a file: ``python -m bench sweep path/to/sweep.yaml`` (or ``.yml``, ``.toml``) instead of a module in
``bench/sweeps/``. Standard library only (PyYAML for YAML files, imported when one is read), so a dry run stays light.

A file holds (``examples/`` has three)::

    name: my-sweep                # names the run (Tune's folder STORAGE/tune/<name>); not a built-in sweep's name
    description: one line         # optional
    base:                         # a partial TrialConfig, same sections and fields as TrialConfig.to_dict()
      method: {name: lora}        # a section given is built from that section's defaults; a section left out is
      optimization: {steps: 100}  # TrialConfig's default; no privacy section (or privacy: null) is a trial without DP
    axes:                         # the grid: every combination, the first axis outermost
      method.name: [full, lora]   # a dotted field: its values
      privacy:                    # a whole section: partial mappings merged into the base's section, or null
        - null
        - {target_epsilon: 8, sampling_rate: 0.02, max_grad_norm: 0.5}
    smoke:                        # optional, used by --smoke only (see below)
      optimization: {steps: 2}
    tracking: mlflow              # optional: none, tensorboard, mlflow or wandb (the command line's --tracking wins)

A grid point is the base, then its values of the section axes, then those of the field axes (so the result does
not depend on the order the axes are written in); an axis on a section the base leaves out starts from
``TrialConfig``'s default for it (``optimization.seed: [0, 1]`` keeps the default 100 steps). Paths
(``model.var_checkpoint``, ``model.vqvae_checkpoint``, ``data.root``, ``evaluation.inception_weights``) may start
with ``{assets}``, the ``--assets`` root (default ``$VARSWEEP_ASSETS``, else ``./assets``) as the built-in paper
sweeps use it; ``~`` is the home folder (in the sweep file's own path too); any other relative path is relative to
the sweep file's folder, so a file and the images beside it work from any current folder; an empty path is an
error. "No value" is ``null`` or the string ``"none"`` (TOML has no null: ``privacy = ["none", {...}]``,
``global_clip_norm = "none"``), for an optional section (``privacy``: no DP; ``audit``: no audit) in ``base``, in a
section axis and in ``smoke``, and for every field that may be null. A field of an optional section
(``privacy.target_epsilon``) on a point without that section is an error. A DP point leaves out the non-DP
optimisation fields (``optimization.batch_size``, ``global_clip_norm``) the base or the ``smoke`` section gives, so
one base serves a privacy axis's non-DP and DP points; set by an axis, they are refused on DP points as anywhere
else. YAML is read with YAML 1.2's core schema:
``5e-4`` is a number (as in TOML and JSON; PyYAML's YAML 1.1 reads a string), ``010`` is ten (octal is ``0o10``,
hex ``0x1f``), ``1:30`` and ``2024-06-30`` are strings (no sexagesimal numbers or dates), booleans are only
``true`` and ``false`` (``yes``, ``no``, ``on``, ``off`` are strings). Merge keys (``{<<: *anchor, seed: 1}``)
work, the explicit keys winning; a key given twice is refused, and so is a key that is not a string (every key
names a section, a field or an axis).

``--smoke`` runs each grid point's smoke version (``bench.sweeps.common.smoke_version``, as for the built-in
sweeps: the same method, relative depth, epsilon, k and seed on the tiny base and offline digits, a few steps, one
CPU worker), then the file's ``smoke:`` section (same shape as ``base``) on top; points whose smoke versions
coincide run once.

Everything is checked before anything starts, and every problem is reported at once in one ``SweepFileError``:
unknown keys, sections and fields (with the closest known name), values of the wrong type, a point that
``TrialConfig`` refuses (each problem once, with the points it affects), repeated values of an axis and points that
are the same trial (an axis over ``resources`` changes no trial id).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .preflight import SweepError
from .schema import (
    MOVED_FIELDS,
    NON_DP_ONLY,
    OPTIONAL_SECTIONS,
    PATH_FIELDS,
    SECTIONS,
    VIEW_SPLITTING_CLIPPING,
    ConfigError,
    TrialConfig,
    absolute,
    is_uri,
)
from .sweeps import SWEEPS, build_sweep
from .sweeps.common import CPU_RESOURCES, Assets, smoke_version

SUFFIXES = (".yaml", ".yml", ".toml")
TOP_LEVEL_KEYS = ("name", "description", "base", "axes", "smoke", "tracking")
ASSETS_PLACEHOLDER = "{assets}"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FIELDS = {name: tuple(f.name for f in dataclasses.fields(kind)) for name, kind in SECTIONS.items()}
DOTTED_FIELDS = tuple(f"{section}.{field}" for section, fields in FIELDS.items() for field in fields)
SHOWN_POINTS = 6  # points named under each problem; the rest are counted
NO_VALUE = "none"  # null, in any format: TOML has no null
# The fields whose annotated type admits None: "none" is None there.
OPTIONAL_FIELDS = frozenset(
    (section, name)
    for section, kind in SECTIONS.items()
    for name, hint in typing.get_type_hints(kind).items()
    if type(None) in typing.get_args(hint)
)
# How a message names a point whose optional section is null.
WITHOUT = {"privacy": "without DP", "audit": "without an audit"}
# Fields of which a section holds exactly one (OptimizationConfig): a point that sets one drops the other's default.
ALTERNATIVES = {"optimization": ({"epochs", "steps"},)}


class SweepFileError(SweepError):
    """A sweep file that cannot run: unreadable, malformed or with invalid grid points; lists every problem."""


@dataclass(frozen=True)
class NamedSweep:
    """The trials of a built-in sweep or a sweep file, with what the command line needs to run them.
    ``source``: the file's path, or None for a built-in sweep; ``tracking``: the file's tracker, if it names one."""

    name: str
    configs: tuple[TrialConfig, ...]
    source: str | None = None
    tracking: str | None = None
    description: str = ""


def is_sweep_file(argument: str) -> bool:
    """Whether a NAME argument means a sweep file (a path ending in .yaml, .yml or .toml) rather than a built-in."""
    return Path(argument).suffix.lower() in SUFFIXES


def named_sweep(argument: str, *, smoke: bool = False, assets: Assets = Assets()) -> NamedSweep:
    """A built-in sweep by name, or a sweep file by path; neither is a ``SweepFileError`` naming the argument."""
    if argument in SWEEPS:
        return NamedSweep(name=argument, configs=tuple(build_sweep(argument, smoke=smoke, assets=assets)))
    if is_sweep_file(argument):
        return load_sweep_file(argument, smoke=smoke, assets=assets)
    raise SweepFileError(
        f"sweep {argument!r}: invalid choice{_closest(argument, SWEEPS)}: neither a built-in sweep "
        f"({', '.join(sorted(SWEEPS))}) nor a sweep file (a path ending in {', '.join(SUFFIXES)})"
    )


def load_sweep_file(path: str | Path, *, smoke: bool = False, assets: Assets = Assets()) -> NamedSweep:
    """The trials of a sweep file (the module docstring says what it holds), each validated; ``smoke``: their
    smoke versions. Raises one ``SweepFileError`` listing every problem of the file and of every grid point."""
    where = f"sweep file {path}"
    document = _read(Path(path).expanduser(), where=where)
    problems = _structure_problems(document)
    if problems:
        raise SweepFileError(_listing(f"{where}: {_count(len(problems), 'problem')}", problems))
    # The folder the path names, a link's own (not its target's): "relative to the file's folder" is where the user
    # put it; ".." is taken lexically, as a shell's cd does.
    folder = Path(os.path.abspath(Path(path).expanduser())).parent
    paths = dict(folder=folder, assets_root=assets.folder())
    points = _grid(document.get("base") or {}, document.get("axes") or {})
    configs, failures = _build_points(points, paths=paths)
    if not failures:
        failures = _duplicates(configs)
    if failures:
        raise SweepFileError(_point_listing(where, failures, total=len(points)))
    if smoke:
        configs = _smoke_versions(configs, document.get("smoke") or {}, paths=paths, where=where)
    return NamedSweep(
        name=document["name"],
        configs=tuple(config for config, _ in configs),
        source=str(path),
        tracking=document.get("tracking"),
        description=document.get("description", ""),
    )


# --- reading ------------------------------------------------------------------------------------------------------
def _read(path: Path, *, where: str) -> dict:
    """The file's top-level mapping; a missing, unreadable or malformed file is named with the parser's position."""
    if not path.exists():
        raise SweepFileError(f"{where} does not exist")
    if not path.is_file():
        raise SweepFileError(f"{where} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SweepFileError(f"{where} cannot be read: {err}") from err
    document = (
        _parse_toml(text, where=where) if path.suffix.lower() == ".toml" else _parse_yaml(text, where=where)
    )
    if not isinstance(document, dict):
        raise SweepFileError(
            f"{where}: expected a mapping with name, base and axes at the top, got {_type(document)}"
        )
    return document


def _parse_toml(text: str, *, where: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SweepFileError(f"{where} is not valid TOML: {err}") from err


def _parse_yaml(text: str, *, where: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SweepFileError(
            f"{where} is not valid YAML: {place}{problem or ' '.join(str(err).split())}"
        ) from err
    except (ValueError, TypeError, RecursionError) as err:
        # A constructor's own error (``!!float abc``, ``!!timestamp 2024-06-31``) carries no position.
        raise SweepFileError(f"{where} is not valid YAML: {err} ({type(err).__name__})") from err


# Tags whose YAML 1.1 resolvers PyYAML's safe loader has and YAML 1.2's core schema replaces or drops.
YAML_11_TAGS = frozenset(f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "timestamp"))
# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution): no "_" in numbers, no sexagesimal
# numbers, no leading-zero octal, no yes/no/on/off booleans, no timestamps (a date is a string: no field holds one).
YAML_12_RESOLVERS = (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (
        "float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
)


def _yaml_loader():
    """PyYAML's safe loader reading YAML 1.2's core schema (``5e-4`` is a number: YAML 1.1 wants ``5.0e-4``, a
    surprise for anyone writing a learning rate; ``010`` is ten, not eight) that refuses a key given twice (YAML 1.1
    keeps the last one) and reads merge keys (``<<: *anchor``)."""
    import yaml

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, pattern) for tag, pattern in resolvers if tag not in YAML_11_TAGS]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

        def construct_mapping(self, node, deep=False):
            # Merge keys first: building a ``<<`` key itself has no constructor. Merged keys come first in
            # node.value and the explicit ones last, so an explicit key overrides a merged one (YAML's rule)
            # and only the explicit keys can be given twice.
            if not isinstance(node, yaml.MappingNode):
                return super().construct_mapping(node, deep)
            explicit = sum(key_node.tag != "tag:yaml.org,2002:merge" for key_node, _ in node.value)
            self.flatten_mapping(node)
            _refuse_repeated_keys(self, node.value[len(node.value) - explicit :])
            return super().construct_mapping(node, deep)

    for kind, pattern, first in YAML_12_RESOLVERS:
        Loader.add_implicit_resolver(f"tag:yaml.org,2002:{kind}", re.compile(f"^(?:{pattern})$"), list(first))
    Loader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
    Loader.add_constructor("tag:yaml.org,2002:float", _yaml_float)
    return Loader


def _refuse_repeated_keys(loader, pairs: list) -> None:
    """A ``ConstructorError`` at the second place a key is given. 1 and true are two keys (both refused later as
    keys that are not strings), not one given twice."""
    import yaml

    seen = set()
    for key_node, _ in pairs:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            continue  # an unhashable key: the safe loader refuses it itself
        if (type(key), key) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice", key_node.start_mark
            )
        seen.add((type(key), key))


def _yaml_int(loader, node) -> int:
    """A YAML 1.2 integer: decimal (leading zeros too), ``0o`` octal or ``0x`` hexadecimal."""
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text if base == 10 else text[2:], base)


def _yaml_float(loader, node) -> float:
    """A YAML 1.2 float: Python's own syntax, or ``.inf``, ``-.inf``, ``.nan`` in any of YAML's cases."""
    text = loader.construct_scalar(node)
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    return special[text.lower()] if text.lower() in special else float(text)


# --- the file's structure -------------------------------------------------------------------------------------------
def _structure_problems(document: dict) -> list[str]:
    """Every problem of the top level, ``base``, ``axes`` and ``smoke`` (unknown keys with the closest known one,
    containers of the wrong type, repeated axis values); an empty list when the grid can be built. Keys that are
    not strings are reported alone: the other checks compare and sort keys as names."""
    problems = _key_problems(document, where="")
    if problems:
        return problems
    problems = [
        f"unknown key {key!r}{_closest(key, TOP_LEVEL_KEYS)}; known: {', '.join(TOP_LEVEL_KEYS)}"
        for key in document
        if key not in TOP_LEVEL_KEYS
    ]
    problems += _name_problems(document.get("name"))
    if not isinstance(document.get("description", ""), str):
        problems.append(f"description: expected a string, got {_type(document['description'])}")
    problems += _tracking_problems(document.get("tracking"))
    for key in ("base", "smoke"):
        problems += _partial_config_problems(document.get(key), key)
    problems += _axes_problems(document.get("axes"))
    return problems


def _key_problems(value: Any, *, where: str) -> list[str]:
    """A problem for every mapping key that is not a string, anywhere in the document (``{1: x}``, ``{true: x}``;
    TOML keys are always strings): every key names a section, a field or an axis."""
    problems = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                problems += _key_problems(item, where=f"{where}.{key}" if where else key)
            else:
                problems.append(
                    f"{where or 'the top level'}: the key {_type(key)} is not a name; keys name sections, fields "
                    "and axes, so they are strings (quote it)"
                )
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems += _key_problems(item, where=f"{where}[{index}]")
    return problems


def _name_problems(name: Any) -> list[str]:
    if name is None:
        return ["name: missing (it names the run: STORAGE/tune/<name>)"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return [f"name: expected letters, digits, '_', '.' or '-' (a folder name), got {name!r}"]
    if name in SWEEPS:
        return [
            f"name: {name!r} is a built-in sweep's name; choose another (each has its own STORAGE/tune/<name>)"
        ]
    return []


def _tracking_problems(tracking: Any) -> list[str]:
    if tracking is None:
        return []
    from .tracking import TRACKERS

    if tracking not in TRACKERS:
        return [f"tracking: expected one of {', '.join(TRACKERS)}, got {tracking!r}"]
    return []


def _partial_config_problems(config: Any, where: str) -> list[str]:
    """Problems of a nested partial config (``base`` or ``smoke``): a mapping of known sections, each a mapping of
    known fields (an optional section may be null)."""
    if config is None:
        return []
    if not isinstance(config, dict):
        return [f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}), got {_type(config)}"]
    problems = []
    for section, fields in config.items():
        if section not in SECTIONS:
            problems.append(
                f"{where}.{section}: unknown section{_closest(section, (*SECTIONS, *DOTTED_FIELDS))}; known: "
                f"{', '.join(SECTIONS)}"
            )
        else:
            problems += _section_problems(fields, section, where=f"{where}.{section}")
    return problems


def _section_problems(fields: Any, section: str, *, where: str) -> list[str]:
    """Problems of one partial section: a mapping of known fields, or null for an optional section (``privacy``: a
    trial without DP; ``audit``: without an audit)."""
    if section in OPTIONAL_SECTIONS and _is_null(fields):
        return []
    if not isinstance(fields, dict):
        null = (
            f' or null / "none" (a trial {WITHOUT.get(section, "without it")})'
            if section in OPTIONAL_SECTIONS
            else ""
        )
        return [f"{where}: expected a mapping of fields{null}, got {_type(fields)}"]
    return [
        f"{where}.{field}: unknown field{_closest(f'{section}.{field}', DOTTED_FIELDS)}; {section} has "
        f"{', '.join(FIELDS[section])}"
        for field in fields
        if field not in FIELDS[section]
    ]


def _axes_problems(axes: Any) -> list[str]:
    """Problems of ``axes``: each key a section or a dotted field, each value a non-empty list without repeats, a
    section's values partial sections; no field set by two axes."""
    if axes is None:
        return []
    if not isinstance(axes, dict):
        return [
            f"axes: expected a mapping of a dotted field (or a section) to a list of values, got {_type(axes)}"
        ]
    problems = []
    for axis, values in axes.items():
        problems += _axis_problems(axis, values)
    for section in SECTIONS:
        if isinstance(axes.get(section), list):
            given = {field for value in axes[section] if isinstance(value, dict) for field in value}
            problems += [
                f"axes.{section}.{field}: set by both the axis {section} and the axis {section}.{field}; give it once"
                for field in sorted(given)
                if f"{section}.{field}" in axes
            ]
    return problems


def _axis_problems(axis: Any, values: Any) -> list[str]:
    where = f"axes.{axis}"
    if axis not in SECTIONS and axis not in DOTTED_FIELDS:
        return [
            f"{where}: no such config field{_closest(str(axis), (*DOTTED_FIELDS, *SECTIONS))} (a dotted field such "
            "as method.name, or a whole section such as privacy)"
        ]
    if isinstance(values, dict) and values and axis in SECTIONS:
        # TOML reads an unquoted ``method.name = [...]`` under [axes] as the table method = {name = [...]}.
        field = next(iter(values))
        return [
            f"{where}: expected a non-empty list of values, got a mapping (meant the axis {axis}.{field}?): a field "
            f'axis is one dotted key, quoted in TOML ("{axis}.{field}" = [...])'
        ]
    if not isinstance(values, list) or not values:
        return [f"{where}: expected a non-empty list of values, got {_type(values)}"]
    problems = []
    if axis in SECTIONS:
        for index, value in enumerate(values):
            problems += _section_problems(value, axis, where=f"{where}[{index}]")
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        key = json.dumps(value, sort_keys=True, default=str)
        if key in seen:
            problems.append(
                f"{where}: the value {_show(value)} is given twice (items {seen[key]} and {index})"
            )
        seen.setdefault(key, index)
    return problems


# --- the grid ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Point:
    """One grid point: its nested partial config and its axis values (how the listings name it)."""

    config: dict
    values: tuple[tuple[str, Any], ...]
    problem: str | None = (
        None  # why the axis values cannot be combined (a privacy field on a point without DP, ...)
    )

    @property
    def label(self) -> str:
        return ", ".join(f"{axis}={_show(value)}" for axis, value in self.values) or "the base"


def _grid(base: dict, axes: dict) -> list[_Point]:
    """Every combination of the axes' values (the first axis outermost), each applied to a copy of the base:
    section axes first, then field axes; a section the base leaves out starts from ``TrialConfig``'s default."""
    names = list(axes)
    points = []
    for combination in itertools.product(*(axes[name] for name in names)):
        values = tuple(zip(names, combination))
        config, problem = copy.deepcopy(base), None
        try:
            for axis, value in sorted(values, key=lambda item: "." in item[0]):
                _apply(config, axis, value)
        except ConfigError as err:
            problem = str(err)
        _drop_base_non_dp_fields(config, base=base, values=values)
        points.append(_Point(config=_with_defaults(config, base), values=values, problem=problem))
    return points


def _drop_base_non_dp_fields(config: dict, *, base: dict, values: tuple) -> None:
    """On a DP point, remove the non-DP optimisation fields (``NON_DP_ONLY``) that only the base set: a base written
    for a privacy axis's non-DP points (a batch under a small split's size) made every DP point fail with "does not
    apply under DP", so comparing the two took two files. A DP trial's id leaves them out anyway. A value an axis
    sets stays, and is refused on a DP point as anywhere else."""
    if _is_null(config.get("privacy")) or not isinstance(config.get("optimization"), dict):
        return
    by_axes = {axis.partition(".")[2] for axis, _ in values if axis.startswith("optimization.")}
    by_axes |= {
        key for axis, value in values if axis == "optimization" and isinstance(value, dict) for key in value
    }
    for name in set(NON_DP_ONLY) - by_axes:
        if name in (base.get("optimization") or {}):
            config["optimization"].pop(name, None)


def _apply(config: dict, axis: str, value: Any) -> None:
    """Set one axis value in a nested partial config: a section's mapping merged into that section (null for an
    optional section), a dotted field's value into its section. A field of an optional section on a point without
    it is a ``ConfigError`` saying why (it would otherwise read as an incomplete privacy section)."""
    section, _, field = axis.partition(".")
    if not field and section in OPTIONAL_SECTIONS and _is_null(value):
        config[section] = None
        return
    if field and section in OPTIONAL_SECTIONS and _is_null(config.get(section)):
        raise ConfigError(
            f"{axis}: set on a point {WITHOUT.get(section, 'without ' + section)} ({section} is null or not "
            f"given): give the {section} section in base, or as mappings of a {section} axis"
        )
    current = config.get(section)
    current = dict(current) if isinstance(current, dict) else {}
    config[section] = {**current, **value} if not field else {**current, field: value}


def _with_defaults(config: dict, base: dict) -> dict:
    """A point's config whose sections the base leaves out (set by axes only) start from ``TrialConfig``'s default
    for them, as if the base had given that default: so ``optimization.seed: [0, 1]`` keeps the default steps."""
    return {
        section: {**_default_section(section, given=fields), **fields}
        if section not in base and isinstance(fields, dict)
        else fields
        for section, fields in config.items()
    }


def _default_section(section: str, *, given: dict) -> dict:
    """``TrialConfig``'s default for a section as a partial mapping: its fields that differ from the section's own
    defaults (optimization: ``{"steps": 100}``; an optional section's default is null: ``{}``), less a field whose
    alternative is ``given`` (epochs replaces the default steps)."""
    declared = next(f for f in dataclasses.fields(TrialConfig) if f.name == section)
    if declared.default_factory is dataclasses.MISSING:
        return {}
    default, kind = declared.default_factory(), SECTIONS[section]
    replaced = {name for group in ALTERNATIVES.get(section, ()) if group & set(given) for name in group}
    return {
        f.name: getattr(default, f.name)
        for f in dataclasses.fields(kind)
        if f.name not in replaced and getattr(default, f.name) != _field_default(f)
    }


def _field_default(declared: dataclasses.Field) -> Any:
    if declared.default_factory is not dataclasses.MISSING:
        return declared.default_factory()
    return declared.default  # MISSING for a required field: never equal to a value


def _build_points(points: list[_Point], *, paths: dict) -> tuple[list[tuple[TrialConfig, _Point]], dict]:
    """(config, point) of every valid point, and {problem: [points]} of the others."""
    built, failures = [], {}
    for point in points:
        if point.problem:
            failures.setdefault(point.problem, []).append(point)
            continue
        try:
            built.append((_trial(point.config, **paths), point))
        except ConfigError as err:
            failures.setdefault(str(err), []).append(point)
    return built, failures


def _trial(config: dict, *, folder: Path, assets_root: str) -> TrialConfig:
    """A ``TrialConfig`` from a nested partial config: each given section from its dataclass defaults, the others
    from ``TrialConfig``'s; paths resolved (``_resolve``). Raises ``ConfigError`` naming the field."""
    sections = {}
    for name, fields in config.items():
        if name in OPTIONAL_SECTIONS and _is_null(fields):
            sections[name] = None
            continue
        kind = SECTIONS[name]
        required = {
            f.name
            for f in dataclasses.fields(kind)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(fields))
        if missing:
            raise ConfigError(f"{name}: missing fields {missing} (a {name} section needs them)")
        values = {
            key: _value(key, value, section=name, folder=folder, assets_root=assets_root)
            for key, value in fields.items()
        }
        sections[name] = kind(**values)
    return TrialConfig(**sections)


def _value(field: str, value: Any, *, section: str, folder: Path, assets_root: str) -> Any:
    """A field's value as the frozen config holds it: a list as a tuple, "none" as None where None is allowed, a
    path resolved; an empty path is a ``ConfigError`` (it would resolve to the sweep file's folder)."""
    if isinstance(value, list):
        return tuple(value)
    if (section, field) in OPTIONAL_FIELDS and _is_null(value):
        return None
    if (section, field) in PATH_FIELDS and isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{section}.{field}: an empty path; leave the field out (or null) for none")
        return _resolve(value, field=f"{section}.{field}", folder=folder, assets_root=assets_root)
    return value


def _resolve(value: str, *, field: str, folder: Path, assets_root: str) -> str:
    """A path of the file made absolute: ``{assets}/...`` under the assets root, another relative path under the
    file's folder, ``~`` expanded; a URI unchanged. Another ``{...}`` placeholder is an error naming the field."""
    if is_uri(value):
        return value
    if value.startswith(ASSETS_PLACEHOLDER):
        value = assets_root + "/" + value[len(ASSETS_PLACEHOLDER) :].lstrip("/\\")
    placeholder = re.search(r"\{[^}]*\}", value)
    if placeholder and placeholder.group() == ASSETS_PLACEHOLDER:
        raise ConfigError(
            f"{field}: {ASSETS_PLACEHOLDER} (the --assets root) stands only at the start of a path, got {value!r}"
        )
    if placeholder:
        raise ConfigError(
            f"{field}: unknown placeholder {placeholder.group()} in {value!r}; the only one is {ASSETS_PLACEHOLDER} "
            "(the --assets root) at the start of a path"
        )
    path = Path(value).expanduser()
    return absolute(str(path if path.is_absolute() else folder / path))


def _duplicates(configs: list[tuple[TrialConfig, _Point]]) -> dict[str, list[_Point]]:
    """{problem: [points]} for points that are the same trial (same id): an axis that changes nothing the id hashes."""
    by_id: dict[str, list[_Point]] = {}
    for config, point in configs:
        by_id.setdefault(config.trial_id, []).append(point)
    return {
        f"the same trial {trial_id} (resources and settings a trial does not use do not enter the trial id): "
        "drop the axis or the repeated values": same
        for trial_id, same in by_id.items()
        if len(same) > 1
    }


def _smoke_versions(
    configs: list[tuple[TrialConfig, _Point]], smoke: dict, *, paths: dict, where: str
) -> list[tuple[TrialConfig, _Point]]:
    """Each point's smoke version with the file's ``smoke:`` section on top, each trial once."""
    kept, failures, seen = [], {}, set()
    for config, point in configs:
        small = smoke_version(config).to_dict()
        # A smoke version spreading its views (k = 128's) would be refused with Opacus's clipping.
        if _keeps_views_whole(smoke):
            small["resources"]["rows_per_forward"] = CPU_RESOURCES.rows_per_forward
        try:
            for section, fields in smoke.items():
                _apply(small, section, fields)
            # as for the base: the smoke section's non-DP fields serve the non-DP points
            if small.get("privacy") is not None:
                for name in NON_DP_ONLY:
                    small["optimization"].pop(name, None)
            trial = _trial(small, **paths)
        except ConfigError as err:
            failures.setdefault(f"smoke: {err}", []).append(point)
            continue
        if trial.trial_id not in seen:
            seen.add(trial.trial_id)
            kept.append((trial, point))
    if failures:
        raise SweepFileError(_point_listing(f"{where} (--smoke)", failures, total=len(configs)))
    return kept


def _keeps_views_whole(smoke: dict) -> bool:
    """Whether the ``smoke:`` section asks for a clipping that keeps an example's views in one forward (Opacus's
    hooks or ghost) without choosing the rows per forward itself."""
    privacy, resources = smoke.get("privacy"), smoke.get("resources")
    clipping = privacy.get("clipping") if isinstance(privacy, dict) else None
    chosen = isinstance(resources, dict) and "rows_per_forward" in resources
    return isinstance(clipping, str) and clipping not in VIEW_SPLITTING_CLIPPING and not chosen


def _is_null(value: Any) -> bool:
    """Whether an optional section's or field's value means none: null (YAML) or "none" (any format; TOML has no
    null)."""
    return value is None or value == NO_VALUE


# --- messages ---------------------------------------------------------------------------------------------------
def _point_listing(where: str, failures: dict[str, list[_Point]], *, total: int) -> str:
    bad = len({id(point) for points in failures.values() for point in points})
    lines = []
    for problem, points in failures.items():
        named = "; ".join(point.label for point in points[:SHOWN_POINTS])
        more = f"; ... ({len(points) - SHOWN_POINTS} more)" if len(points) > SHOWN_POINTS else ""
        lines.append(f"{problem}\n  affects {_count(len(points), 'point')}: {named}{more}")
    return _listing(f"{where}: {bad} of {_count(total, 'grid point')} cannot run; nothing was started", lines)


def _listing(header: str, problems: list[str]) -> str:
    return "\n".join([f"{header}:", *problems])


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _closest(name: Any, known) -> str:
    if name in MOVED_FIELDS:
        return f" (moved to {MOVED_FIELDS[name]})"
    match = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


def _type(value: Any) -> str:
    return (
        f"{value!r} ({type(value).__name__})" if not isinstance(value, (dict, list)) else type(value).__name__
    )
