"""The embedded default runs end to end (with few steps) and reuses its base models on a second run."""
from __future__ import annotations

import json

from bench.demo import DemoConfig, run_demo
from trainables.pretrain import Schedule


def test_demo_end_to_end_and_reuse(tmp_path, capsys):
    config = DemoConfig(shapes_per_class=8,
                        vqvae_schedule=Schedule(steps=4, batch_size=8, lr=1e-3, weight_decay=0.0, log_every=2),
                        pretrain_schedule=Schedule(steps=4, batch_size=8, lr=1e-3, log_every=2),
                        finetune_schedule=Schedule(steps=3, batch_size=8, lr=1e-3, log_every=1))
    summary = run_demo(config, tmp_path)
    for name in summary["outputs"] + ["summary.json", "var_digits_full.pth", "var_digits_full.pth.json", "base/vqvae.pth", "base/var_base.pth"]:
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(summary["history"]) == {"vqvae", "pretrain", "finetune"}
    assert all(value > 0 for value in summary["metrics"].values())
    again = run_demo(config, tmp_path)
    assert "reusing the base models" in capsys.readouterr().out
    assert set(again["history"]) == {"finetune"}
    saved = json.loads((tmp_path / "var_digits_full.pth.json").read_text())
    assert saved["architecture"]["num_classes"] == 10 and saved["metadata"]["demo"]["seed"] == 0
