"""``fimlora demo`` end to end on the embedded MiniLM + movie sentiment (small settings; opt-in marker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_two_seeds_writes_adapters_figures_and_a_self_contained_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "fimlora.cli", "demo", "--out", str(out), "--seeds", "0", "1", "--max-train", "64",
         "--no-progress"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| uniform |" in proc.stdout and "| fim |" in proc.stdout and "±" in proc.stdout
    for seed in (0, 1):
        for method in ("uniform", "fim"):
            run = out / f"seed-{seed}" / method
            assert (run / "adapter" / "adapter_model.safetensors").is_file()
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["eval"]["n"] > 900  # the whole test split
    results = json.loads((out / "results.json").read_text())
    lora = {r["method"]: r["lora_params"] for r in results["runs"]}
    assert lora["fim"] <= lora["uniform"]  # same parameter budget, never above it
    figures = ("rank_map_fim_seed-0.png", "rank_map_fim_seed-1.png", "rank_bars_fim.png", "curves.png")
    for name in ("rank_map.json", *figures, "report.md", "run.json", "seed-0/fim/predictions.json"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    # Figures embedded (self-contained page), each linking to its full-size file.
    assert html.count("data:image/png;base64,") == 4 and 'src="rank' not in html
    assert all(f'<a href="{name}">' in html for name in figures)
    assert 'id="conclusion"' in html and "averaged over 2 seeds" in proc.stdout
    # the report says how long the runs trained and why (64 examples, batch 16, the default 3 epochs)
    assert "12 optimizer steps (3 epochs of 64 examples, batch 16)" in (out / "report.md").read_text()

    again = subprocess.run(
        [sys.executable, "-m", "fimlora.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
