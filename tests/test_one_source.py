"""One source for every setting: the library's entry points take the trial config's sections themselves
(``bench.schema``), so no setting is repeated under another name or with another default (issue 15, item 1).

For every entry point that takes settings, each parameter, and each field of a dataclass it takes that is not a
config section, is checked: a config section's name annotated as a section carries that section; a config field's name carries no
default of its own (the caller passes the config's value); a name an earlier mirror gave a config field is gone.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing

import pytest

from bench import schema
from trainables.evaluation import evaluate as evaluate_module
from trainables.evaluation.generate import generate
from trainables.finetune import finetune
from trainables.methods import adapt
from trainables.prior import build_prior_bank
from trainables.privacy import make_private, validate_privacy
from trainables.trial import run_trial

ENTRY_POINTS = (
    finetune,
    make_private,
    validate_privacy,
    adapt,
    generate,
    evaluate_module.evaluate,
    build_prior_bank,
    run_trial,
)
CONFIG_FIELDS: dict[
    str, str
] = {}  # field name -> the fields of that name ("optimization.batch_size or evaluation.batch_size")
for _section, _kind in schema.SECTIONS.items():
    for _field in dataclasses.fields(_kind):
        CONFIG_FIELDS[_field.name] = " or ".join(
            filter(None, (CONFIG_FIELDS.get(_field.name), f"{_section}.{_field.name}"))
        )
# Names the library's former mirrors (PrivacySpec, FinetuneOptions, AdaptationSpec, SamplingSettings) gave config fields.
ALIASES = {
    "lr": "optimization.learning_rate",
    "cfg": "evaluation.guidance_scale",
    "physical_batch_size": "resources.rows_per_forward",
    "physical_batch_rows": "resources.rows_per_forward",
    "eval_every": "evaluation.convergence_every_steps",
    "eval_points": "evaluation.convergence_points",
    "every": "resources.checkpoint_every_steps",
    "every_minutes": "resources.checkpoint_every_minutes",
    "every_fraction": "resources.checkpoint_every_fraction",
    "num_classes_init": "method.class_init",
}
SECTION_TYPES = set(schema.SECTIONS.values())


def _classes(hint) -> list[type]:
    """The classes an annotation names (the members of a union, the element of an optional)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [c for option in typing.get_args(hint) for c in _classes(option)]
    return [hint] if isinstance(hint, type) else []


def _settings_problems(where: str, name: str, hint, default) -> list[str]:
    if name in ALIASES:
        return [f"{where}: '{name}' repeats {ALIASES[name]} under another name"]
    sections = [c for c in _classes(hint) if c in SECTION_TYPES]
    if name in schema.SECTIONS and sections and schema.SECTIONS[name] not in sections:
        return [f"{where}: '{name}' is not the {schema.SECTIONS[name].__name__} section"]
    if (
        name in CONFIG_FIELDS
        and default is not inspect.Parameter.empty
        and default is not dataclasses.MISSING
    ):
        return [f"{where}: '{name}' repeats {CONFIG_FIELDS[name]} with a default of its own ({default!r})"]
    return []


def _run_time_dataclasses(hint) -> list[type]:
    return [c for c in _classes(hint) if dataclasses.is_dataclass(c) and c not in SECTION_TYPES]


def settings_problems(function) -> list[str]:
    """Every parameter of ``function`` and every field of the run-time dataclasses it takes that repeats a config
    setting (see the module docstring)."""
    hints, problems = typing.get_type_hints(function), []
    for name, parameter in inspect.signature(function).parameters.items():
        problems += _settings_problems(function.__qualname__, name, hints.get(name), parameter.default)
        for kind in _run_time_dataclasses(hints.get(name)):
            field_hints = typing.get_type_hints(kind)
            for field in dataclasses.fields(kind):
                default = (
                    field.default if field.default_factory is dataclasses.MISSING else field.default_factory
                )
                where = f"{function.__qualname__}({name}: {kind.__name__})"
                problems += _settings_problems(where, field.name, field_hints[field.name], default)
    return problems


@pytest.mark.parametrize("function", ENTRY_POINTS, ids=lambda f: f.__qualname__)
def test_entry_points_take_the_config_sections_and_repeat_no_setting(function):
    assert settings_problems(function) == []


def test_the_check_finds_a_repeated_setting():
    """What the check above exists for: a mirror with its own defaults (as FinetuneOptions and PrivacySpec were)."""

    @dataclasses.dataclass(frozen=True)
    class Mirror:
        steps: int
        lr: float
        batch_size: int = 32

    def mirrored(
        var, *, options: Mirror, optimization: schema.PrivacyConfig, autocast_bf16: bool = False
    ) -> None:
        pass

    mirrored.__globals__.update(Mirror=Mirror)  # get_type_hints resolves the string annotations here
    try:
        where = mirrored.__qualname__
        assert sorted(settings_problems(mirrored)) == sorted(
            [
                f"{where}: 'optimization' is not the OptimizationConfig section",
                f"{where}: 'autocast_bf16' repeats optimization.autocast_bf16 with a default of its own (False)",
                f"{where}(options: Mirror): 'lr' repeats optimization.learning_rate under another name",
                f"{where}(options: Mirror): 'batch_size' repeats optimization.batch_size or evaluation.batch_size with a default of its own (32)",
            ]
        )
    finally:
        del mirrored.__globals__["Mirror"]


def test_the_evaluate_command_defaults_to_the_configs_values():
    """The standalone evaluation's options are EvaluationConfig's fields with EvaluationConfig's defaults (no third copy
    of the sampling defaults), and its bf16 switch defaults as a trial's does."""
    parser = evaluate_module._parser()
    defaults = {action.dest: action.default for action in parser._actions}
    evaluation_fields = {field.name: field.default for field in dataclasses.fields(schema.EvaluationConfig)}
    assert not set(defaults) & set(ALIASES)
    assert {dest: default for dest, default in defaults.items() if dest in evaluation_fields} == {
        dest: evaluation_fields[dest] for dest in defaults if dest in evaluation_fields
    }
    assert {
        "guidance_scale",
        "top_k",
        "top_p",
        "batch_size",
        "sampling_seed",
        "num_images",
        "extractor",
    } <= set(defaults)
    assert defaults["autocast_bf16"] == schema.OptimizationConfig.autocast_bf16
