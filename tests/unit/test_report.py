"""fimlora.report: the conclusion sentence, the HTML document, and compare_runs on run directories.

The run directories here are written by hand in the format ``fimlora train`` writes (metrics, rank map,
history, predictions), so every path of the renderer is reached in milliseconds; tests/browser renders
reports of real runs and opens them in Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fimlora.rankmap import RankMap
from fimlora.report import Report, compare_accuracy, compare_runs, load_run

MODULES = [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in ("query", "value")]


def _write_run(
    root: Path,
    method: str,
    seed: int,
    correct: list[int],
    *,
    ranks: list[int] | None = None,
    predictions: bool = True,
) -> Path:
    out = root / f"{method}-{seed}"
    out.mkdir(parents=True)
    n = len(correct)
    labels = [i % 2 for i in range(n)]
    preds = [y if ok else 1 - y for y, ok in zip(labels, correct, strict=True)]
    metrics = {
        "method": method, "seed": seed, "eval": {"accuracy": sum(correct) / n, "loss": 0.5, "n": n},
        "steps": 10, "trainable_params": 1000, "lora_params": 900,
        "calibration_seconds": 1.0 if method == "fim" else None,
        "train_seconds": 12.0, "train_examples": 64, "eval_examples": n,
        "label_counts": {"train": {"0": 40, "1": 24}, "eval": {"0": n - n // 2, "1": n // 2}},
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics))
    ranks = ranks or [8] * len(MODULES)
    meta = (
        {"r_min": 4, "r_max": 32, "lora_r": 8, "allocation": {"budget_params": 900}}
        if method == "fim"
        else {}
    )
    RankMap(dict(zip(MODULES, ranks, strict=True)), metadata=meta).save_json(out / "rank_map.json")
    (out / "history.json").write_text(
        json.dumps({"losses": [[s, 1.0 / s] for s in range(1, 11)], "evals": []})
    )
    if predictions:
        (out / "predictions.json").write_text(json.dumps({"predictions": preds, "labels": labels}))
    (out / "task.json").write_text(json.dumps({"label_names": ["negative", "positive"]}))
    return out


def test_seed_comparison_sentence_states_difference_interval_and_verdict(tmp_path: Path) -> None:
    base = [load_run(_write_run(tmp_path, "uniform", s, [1] * 80 + [0] * 20)) for s in range(3)]
    close = [load_run(_write_run(tmp_path, "fim", s, [1] * (79 + s) + [0] * (21 - s))) for s in range(3)]
    c = compare_accuracy(close, base)
    assert c is not None and c.basis == "seeds" and c.n == 3
    assert c.mean == pytest.approx(0.0) and not c.distinguishable
    text = c.sentence()
    assert "FIM-LoRA ties with uniform LoRA" in text and "not distinguishable from seed-to-seed noise" in text
    assert "above on 1 and below on 1 of 3 seeds" in text and "sign-flip p = 1" in text

    far = [load_run(_write_run(tmp_path / "b", "fim", s, [1] * (90 + s) + [0] * (10 - s))) for s in range(3)]
    c = compare_accuracy(far, base)
    assert c is not None and c.distinguishable and c.low > 0
    assert re.search(
        r"FIM-LoRA is 11\.00 points above uniform LoRA .*: larger than seed-to-seed noise", c.sentence()
    )


def test_one_seed_uses_the_paired_test_set_error_when_predictions_exist(tmp_path: Path) -> None:
    base = load_run(_write_run(tmp_path, "uniform", 0, [1] * 800 + [0] * 226))
    fim = load_run(_write_run(tmp_path, "fim", 0, [1] * 782 + [0] * 244))
    c = compare_accuracy([fim], [base])
    assert c is not None and c.basis == "test set, paired"
    # fim is right on a subset of uniform's examples: 18 discordant pairs, all for uniform.
    assert c.p_value == pytest.approx(2 / 2**18)
    assert c.distinguishable and "larger than test-set noise" in c.sentence()
    no_preds = load_run(_write_run(tmp_path / "np", "fim", 0, [1] * 782 + [0] * 244, predictions=False))
    c = compare_accuracy([no_preds], [base])
    assert c is not None and c.basis == "test set, unpaired" and not c.distinguishable
    assert "within test-set noise" in c.sentence() and "unpaired" in c.sentence()
    other_seed = load_run(_write_run(tmp_path / "s", "fim", 5, [1] * 10))
    assert compare_accuracy([other_seed], [base]) is None


def test_html_is_responsive_with_real_tables_and_linked_figures(tmp_path: Path) -> None:
    png = tmp_path / "fig.png"
    from fimlora.plot import plot_training_curves

    plot_training_curves({"a": [(1, 1.0), (2, 0.5)]}, png)
    report = Report("t").conclusion("c").table(["a", "b"], [["x", 1]], caption="cap").figure(png, "f")
    report.code("fimlora demo --out out/demo")
    _, page = report.write(tmp_path)
    text = page.read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert '<p class="conclusion" id="conclusion">c</p>' in text
    assert '<div class="table-scroll"><table>' in text and "<td>x</td>" in text
    assert '<a href="fig.png"><img alt="f" src="data:image/png;base64,' in text
    assert re.search(r'width="\d+" height="\d+"', text)
    assert "| a | b |" not in text  # no Markdown source in the page
    assert "| a | b |" in (tmp_path / "report.md").read_text()


def test_compare_runs_report(tmp_path: Path) -> None:
    runs = []
    for s in range(3):
        runs.append(_write_run(tmp_path, "uniform", s, [1] * 80 + [0] * 20))
        runs.append(
            _write_run(tmp_path, "fim", s, [1] * (77 + s) + [0] * (23 - s), ranks=[4, 12 + s, 4, 12 - s])
        )
    result = compare_runs(runs, tmp_path / "cmp")
    (c,) = result["comparisons"]
    assert c["method"] == "fim" and c["seeds"] == [0, 1, 2] and c["mean"] == pytest.approx(-0.02)
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert c["sentence"] in html.replace("&#x27;", "'")
    assert "± is the sample standard deviation over seeds" in html
    assert html.count("<tr><td>") >= 3 + 4  # per-seed rows and the mean row, plus the summary rows
    assert "Spearman vs mean map" in html  # the seeds' rank maps against their mean
    for s in range(3):
        assert (tmp_path / "cmp" / f"rank_map_fim_seed-{s}.png").is_file()
    assert (tmp_path / "cmp" / "rank_bars_fim.png").is_file() and (tmp_path / "cmp" / "curves.png").is_file()
    assert "not set their times side by side" in html
    assert "fimlora compare " in html and "--out" in html
    assert "always predicting the majority class scores 50.0%" in html


def test_demo_command_reproduces_the_config() -> None:
    import shlex

    from fimlora.cli import _demo_section, build_parser
    from fimlora.cli_options import section_values
    from fimlora.demo import DemoConfig, demo_command

    cfg = DemoConfig(seeds=[0, 1, 2], max_train=64, lr=3e-3, progress=False)
    command = demo_command(cfg, "out/my demo")
    assert command == "fimlora demo --out 'out/my demo' --seeds 0 1 2 --max-train 64 --lr 0.003"
    args = build_parser().parse_args(shlex.split(command)[1:])
    again = DemoConfig(**section_values(args, _demo_section()))
    assert again == DemoConfig(seeds=[0, 1, 2], max_train=64, lr=3e-3) and args.out == "out/my demo"


def test_demo_length_is_past_the_plateau_and_the_report_says_why() -> None:
    from fimlora.demo import DemoConfig, _length_fact

    default = _length_fact(DemoConfig(), 2000)
    assert default.startswith("375 optimizer steps (3 epochs of 2,000 examples, batch 16)")
    assert "Why this long" in default and "docs/results/full/length.md" in default and "10 minutes" in default
    assert "may still be learning" in _length_fact(DemoConfig(epochs=1), 2000)
    assert "the benchmark trains 500." in _length_fact(DemoConfig(epochs=4), 2000)


def test_demo_says_how_its_fim_lora_shares_the_budget() -> None:
    """The report's description of FIM-LoRA follows FimConfig's normalisation (the default: "none")."""
    from fimlora.demo import DemoConfig, _setup_facts

    summary = {"wall_seconds": 1.0, "train_examples": 2000, "test_examples": 1026}
    methods = dict(_setup_facts(DemoConfig(), summary))["methods"]
    assert "in proportion to the scores (FimConfig's default normalize='none')" in methods
    assert "module kind" not in methods
