"""Every quantity a table or figure shows, in one place: where it comes from in a result record, its direction
(which way is better), its unit and how it is printed. Plain data; no torch, no Ray."""

from __future__ import annotations

from dataclasses import dataclass

from bench.schema import LORA_PRESETS, record_key_type, record_value


@dataclass(frozen=True)
class Metric:
    """``source``: dotted path into a result record (``metrics.fid``); ``scale`` multiplies the stored value for
    display (fractions shown as percent); ``decimals`` for tables; ``better``: "lower", "higher" or None."""

    name: str
    label: str
    source: str
    better: str | None
    unit: str = ""
    scale: float = 1.0
    decimals: int = 2

    def format(self, value: float) -> str:
        if self.name == "trainable_params":
            return format_count(value)
        text = f"{value:.{self.decimals}f}"
        # a small non-zero value (a tiny model's PFLOPs) would read as none at all
        if value and float(text) == 0:
            return f"{value:.2g}"
        return text

    @property
    def axis_label(self) -> str:
        """ "FID ↓", "Training compute [PFLOPs] ↓": the arrow points the better way."""
        arrow = {"lower": " ↓", "higher": " ↑"}.get(self.better or "", "")
        return f"{self.label}{f' [{self.unit}]' if self.unit else ''}{arrow}"


def _metrics(*items: Metric) -> dict[str, Metric]:
    return {m.name: m for m in items}


METRICS = _metrics(
    Metric("fid", "FID", "metrics.fid", "lower"),
    Metric("precision", "Precision", "metrics.precision", "higher", unit="%", scale=100.0),
    Metric("recall", "Recall", "metrics.recall", "higher", unit="%", scale=100.0),
    Metric("kid", "KID", "metrics.kid_mean", "lower", decimals=4),
    # A fixed classifier's accuracy on images generated for each class: does the model draw the class it was asked
    # for (FID and precision/recall ignore the label). Recorded where a classifier exists (the digits demo).
    Metric(
        "class_accuracy",
        "Class accuracy",
        "metrics.class_accuracy",
        "higher",
        unit="%",
        scale=100.0,
        decimals=1,
    ),
    Metric("train_pflops", "Training compute", "cost.train_pflops", "lower", unit="PFLOPs", decimals=1),
    Metric("sample_pflops", "Sampling compute", "cost.sample_pflops", "lower", unit="PFLOPs", decimals=2),
    Metric("gpu_hours", "GPU hours", "cost.gpu_hours", "lower", unit="h", decimals=2),
    Metric("train_seconds", "Training time", "cost.train_seconds", "lower", unit="s", decimals=0),
    Metric("wall_seconds", "Wall time", "cost.wall_seconds", "lower", unit="s", decimals=0),
    Metric(
        "rows_per_second",
        "Training throughput",
        "cost.rows_per_second",
        "higher",
        unit="rows/s",
        decimals=1,
    ),
    Metric(
        "sample_images_per_second",
        "Sampling throughput",
        "cost.sample_images_per_second",
        "higher",
        unit="images/s",
        decimals=1,
    ),
    Metric("mfu", "MFU", "cost.mfu", "higher", unit="%", scale=100.0, decimals=1),
    Metric(
        "peak_memory_gib",
        "Peak memory",
        "cost.peak_memory_bytes",
        "lower",
        unit="GiB",
        scale=1 / 1024**3,
        decimals=1,
    ),
    Metric("trainable_params", "Trainable parameters", "parameters.trainable", None, decimals=0),
    Metric("epsilon_spent", "epsilon spent (RDP)", "privacy.epsilon_rdp", "lower", decimals=2),
    Metric("epsilon_spent_prv", "epsilon spent (PRV)", "privacy.epsilon_prv", "lower", decimals=2),
    Metric("noise_multiplier", "sigma", "privacy.noise_multiplier", None, decimals=3),
    Metric("dp_steps", "DP steps", "privacy.steps", None, decimals=0),
)


def lookup(record: dict, source: str):
    """The value at a dotted path of a record, or None where the record lacks it (not measured, section not
    recorded); a path the typed result record does not define raises (``bench.schema.record_value``)."""
    return record_value(record, source)


for _metric in METRICS.values():  # a source the typed record does not define fails at import, naming it
    record_key_type(_metric.source)


# Display names of the adaptation methods, in the order tables list them (the un-adapted base model first, as
# the reference row).
METHOD_LABELS = {
    "base": "Base",
    "full": "FFT",
    "lora": "LoRA",
    "ln_tuning": "LNTuning",
    "lora_attention": "LoRA-A",
    "lora_mlp": "LoRA-M",
}
# Table 10 names the LoRA variants by the layers they adapt.
VARIANT_LABELS = {
    "lora_attention": "LoRA-A",
    "lora_mlp": "LoRA-M",
    "lora": "LoRA-AM+LN",
    "ln_tuning": "LNTuning",
}
VARIANT_TARGETS = {
    "lora_attention": "attention qkv+proj",
    "lora_mlp": "mlp fc1+fc2",
    "lora": "attention+mlp+adaln",
    "ln_tuning": "adaln",
}
# The paper's LoRA variants by the layer groups they adapt (each its method's preset): (label, targets as printed).
PAPER_VARIANTS = {
    LORA_PRESETS[m]: (VARIANT_LABELS[m], VARIANT_TARGETS[m]) for m in VARIANT_LABELS if m in LORA_PRESETS
}
# How a LoRA group reads in a variant's label ("LoRA-AM+LN") and in its targets column.
GROUP_LETTERS = {"attention": "A", "mlp": "M"}
GROUP_NAMES = {"attention": "attention", "mlp": "mlp", "modulation": "adaln"}


def effective_targets(method: str, targets: str | None) -> str | None:
    """The LoRA groups a trial adapts, "+"-joined as the trials table writes them (``lora_targets``; None: its
    method's preset); None for a method that is not LoRA."""
    if method not in LORA_PRESETS:
        return None
    return targets if isinstance(targets, str) else "+".join(LORA_PRESETS[method])


def variant(method: str, targets: str | None) -> tuple[str, str]:
    """Table 10's (variant, targets) of a trial, from the groups it adapts rather than its method's name: a paper
    variant as the paper prints it, any other LoRA as its groups ("LoRA-AM", "attention+mlp")."""
    groups = effective_targets(method, targets)
    if groups is None:
        return VARIANT_LABELS[method], VARIANT_TARGETS[method]
    split = tuple(groups.split("+"))
    if split in PAPER_VARIANTS:
        return PAPER_VARIANTS[split]
    return _lora_label(split), "+".join(GROUP_NAMES[g] for g in split)


def _lora_label(groups: tuple[str, ...]) -> str:
    """ "LoRA-AM", "LoRA-A+LN", "LoRA-LN": attention and MLP by letter, the AdaLN modulation as "+LN"."""
    letters = "".join(GROUP_LETTERS[g] for g in groups if g in GROUP_LETTERS)
    modulation = "modulation" in groups
    return "LoRA-" + letters + ("+LN" if modulation and letters else "LN" if modulation else "")


# The paper's dataset column names (the paper used exactly these datasets).
DATASET_COLUMNS = {
    "food101": "food101",
    "cub200": "cub200",
    "flowers102": "flowers102",
    "stanford_cars": "cars196",
    "oxford_pet": "pets",
}


# The feature extractor of the published numbers: FIDs from any other extractor are not comparable with them.
PAPER_EXTRACTOR = "inception-v3-compat"


def method_label(method: str, epsilon: float | None = None, k: int = 1) -> str:
    """ "LoRA", "DP-LoRA ε=8, k=2": a trial's method as a reader names it (epsilon None or NaN: no DP)."""
    if epsilon is None or epsilon != epsilon:  # NaN is how the trials table marks "no DP"
        return METHOD_LABELS[method]
    return f"DP-{METHOD_LABELS[method]} ε={epsilon:g}, k={k}"


def format_count(count: float) -> str:
    """Parameter counts as the paper prints them: 309.6M, 6.02M, 0.83M."""
    millions = count / 1e6
    return f"{millions:.1f}M" if millions >= 100 else f"{millions:.2f}M"


def format_percent_share(pct: float) -> str:
    """Trainable share in percent: "100" for full fine-tuning, else two decimals."""
    return "100" if abs(pct - 100.0) < 5e-3 else f"{pct:.2f}"
