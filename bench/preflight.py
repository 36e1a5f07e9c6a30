"""The driver's preflight of a whole sweep: every check that needs no GPU, over every trial, before anything
starts; all problems of all trials are reported at once. No Ray here (the dry run imports this)."""
from __future__ import annotations

from .errors import VarsweepError
from .schema import TrialConfig


class SweepError(VarsweepError):
    """The sweep cannot start; lists every bad trial."""


def check_sweep(configs: list[TrialConfig], *, cache_dir: str, write: bool = True) -> dict[str, object]:
    """Preflight of every trial (files, datasets, privacy budgets) before anything starts; raises ``SweepError``
    naming every failing trial and its problem. Returns {trial_id: Preflight}. ``write=False`` creates nothing."""
    from trainables import trial  # the driver's only: Tune's trial actors import this module and never need it

    found, problems = {}, []
    for config in configs:
        try:
            found[config.trial_id] = trial.preflight(config, cache_dir, write=write)
        except (ValueError, OSError) as err:
            problems.append(f"  {config.label} ({config.trial_id}): {err}")
    if problems:
        raise SweepError(f"{len(problems)} of {len(configs)} trials cannot run; nothing was started:\n" + "\n".join(problems))
    return found
