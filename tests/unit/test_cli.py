"""The real ``fimlora`` entry point, in subprocesses, on tiny random models and tiny data files.

Covers every subcommand and ``--help``, YAML config + ``--set`` overrides + provenance, the user errors
(each: one line on stderr, exit status 2, nothing written) and resume after SIGKILL (same adapter as an
uninterrupted run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.data_files import classification_rows, multiple_choice_rows, sft_rows, write_csv, write_jsonl
from helpers.tiny_models import make_tiny_bert, make_tiny_llama
from safetensors.torch import load_file

FAST = ["--no-progress", "--device", "cpu"]
# One thread: tiny models gain nothing from two, and OpenMP spin-waits collapse when CPUs are shared.
ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PYTHONWARNINGS="ignore",
    OMP_NUM_THREADS="1",
)


def fimlora(
    *args: str | Path, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fimlora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fimlora {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "bert": make_tiny_bert(root / "bert"),
        "llama": make_tiny_llama(root / "llama"),
        "train_csv": write_csv(root / "train.csv", classification_rows(48)),
        "dev_csv": write_csv(root / "dev.csv", classification_rows(16, offset=48)),
        "sft": write_jsonl(root / "sft.jsonl", sft_rows(24)),
        "mc": write_jsonl(root / "mc.jsonl", multiple_choice_rows()),
    }


def _train_args(ws: dict[str, Path], out: Path, *extra: str, calibrate: bool = True) -> list[str | Path]:
    """A tiny-BERT run; ``calibrate``: pass --calibration-batches (a method that does not calibrate refuses it)."""
    return [
        "train", "--model", ws["bert"], "--data", ws["train_csv"], "--eval-data", ws["dev_csv"], "--out", out,
        "--r", "4", "--batch-size", "8", *(["--calibration-batches", "2"] if calibrate else []), *FAST, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(workspace: dict[str, Path]) -> dict[str, Path]:
    """A fim run (flags) and a uniform run (YAML config + --set), on the tiny BERT."""
    ws = workspace
    fim_out = ws["root"] / "run_fim"
    fimlora(*_train_args(ws, fim_out, "--method", "fim", "--max-steps", "6"))
    cfg = ws["root"] / "cfg.yaml"
    cfg.write_text("method: uniform\nseed: 3\ntrain:\n  lr: 0.002\n  max_steps: 4\nlora:\n  alpha: 4\n")
    uni_out = ws["root"] / "run_uniform"
    fimlora(*_train_args(ws, uni_out, "--config", cfg, "--set", "train.max_steps=5", calibrate=False))
    return {"fim": fim_out, "uniform": uni_out}


def test_help_for_every_subcommand() -> None:
    top = fimlora("--help")
    for command in ("demo", "allocate", "train", "eval", "plot", "export", "compress", "compare", "methods"):
        assert command in top.stdout
    # Each subcommand's help, in one interpreter (the parser is the same object the entry point builds).
    code = (
        "import contextlib, io, sys\nfrom fimlora.cli import main\n"
        "for c in ['demo','allocate','train','eval','plot','export','compress','compare','methods']:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try: main([c, '--help'])\n"
        "        except SystemExit as e: assert e.code == 0\n"
        "    print(c, len(buf.getvalue()))\n"
        "    assert 'usage: fimlora ' + c in buf.getvalue()\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120, env=ENV
    )
    train_help = fimlora("train", "--help").stdout
    # FimConfig's field docstring is the help text (single source).
    assert "Number of forward/backward passes whose LoRA-B gradients are accumulated" in " ".join(
        train_help.split()
    )
    assert "--method" in train_help and "uniform" in train_help and "fim" in train_help


def test_train_writes_adapter_metrics_and_provenance(trained: dict[str, Path]) -> None:
    for run in trained.values():
        for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "rank_map.json", "metrics.json",
                     "history.json", "config.json", "run.json", "task.json", "curves.png", "rank_map.png"):  # fmt: skip
            assert (run / name).is_file(), name
        assert not (run.parent / f".{run.name}.partial").exists()
        assert not (run / "checkpoints").exists()
        # Per-example predictions of the final evaluation (paired test-set errors in reports), not in metrics.
        predictions = json.loads((run / "predictions.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        assert len(predictions["predictions"]) == len(predictions["labels"]) == metrics["eval"]["n"] == 16
        assert "predictions" not in metrics["eval"] and sum(metrics["label_counts"]["eval"].values()) == 16
    fim_metrics = json.loads((trained["fim"] / "metrics.json").read_text())
    uni_metrics = json.loads((trained["uniform"] / "metrics.json").read_text())
    assert (
        fim_metrics["method"] == "fim"
        and fim_metrics["steps"] == 6
        and 0 <= fim_metrics["eval"]["accuracy"] <= 1
    )
    assert fim_metrics["lora_params"] <= 4 * sum(
        sum(s)
        for s in json.loads((trained["fim"] / "rank_map.json").read_text())["metadata"]["shapes"].values()
    )
    # YAML config, flags and --set layered: --set (5) beats the file's max_steps (4); file's lr/seed kept.
    config = json.loads((trained["uniform"] / "config.json").read_text())
    assert config["method"] == "uniform" and config["seed"] == 3
    assert (
        config["train"]["lr"] == 0.002 and config["train"]["max_steps"] == 5 and config["lora"]["alpha"] == 4
    )
    assert uni_metrics["steps"] == 5
    run = json.loads((trained["uniform"] / "run.json").read_text())
    assert (
        run["seed"] == 3 and run["versions"]["torch"] and "commit" in run["git"] and "train" in run["command"]
    )


def test_eval_plot_export_compare(workspace: dict[str, Path], trained: dict[str, Path]) -> None:
    root = workspace["root"]
    ev = fimlora(
        "eval", trained["fim"], "--data", workspace["dev_csv"], "--device", "cpu", "--out", root / "eval.json"
    )
    metrics = json.loads((root / "eval.json").read_text())
    assert metrics["n"] == 16 and 0 <= metrics["accuracy"] <= 1 and '"accuracy"' in ev.stdout
    # Same number as the run's own final evaluation: the saved adapter (with its head) is the trained one.
    trained_acc = json.loads((trained["fim"] / "metrics.json").read_text())["eval"]["accuracy"]
    assert metrics["accuracy"] == pytest.approx(trained_acc)

    fimlora("plot", trained["fim"], "--out", root / "plots")
    assert (root / "plots" / "rank_map.png").is_file() and (root / "plots" / "curves.png").is_file()

    fimlora("export", trained["fim"], "--out", root / "exported")
    exported = json.loads((root / "exported" / "adapter_config.json").read_text())
    assert exported["rank_pattern"] == {} and exported["r"] == exported["lora_alpha"]

    cmp = fimlora("compare", trained["fim"], trained["uniform"], "--out", root / "cmp")
    assert "fim" in cmp.stdout and "uniform" in cmp.stdout
    html = (root / "cmp" / "report.html").read_text()
    assert "data:image/png;base64," in html and (root / "cmp" / "report.md").is_file()

    methods = fimlora("methods").stdout.split()
    assert "uniform" in methods and "fim" in methods


def test_allocate(workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "alloc"
    proc = fimlora("allocate", "--model", workspace["bert"], "--data", workspace["train_csv"], "--r", "4",
                   "--calibration-batches", "2", "--budget-params", "2k", "--r-min", "1", "--out", out, *FAST)  # fmt: skip
    data = json.loads((out / "rank_map.json").read_text())
    ranks, shapes = data["ranks"], data["metadata"]["shapes"]
    assert sum(r * sum(shapes[n]) for n, r in ranks.items()) <= 2000
    assert (
        (out / "rank_map.png").is_file() and (out / "scores.json").is_file() and (out / "run.json").is_file()
    )
    params = sum(r * sum(shapes[n]) for n, r in ranks.items())
    # The summary names the map's own parameter count and the budget it was given (not uniform LoRA's).
    assert f"LoRA params {params} (budget 2000 params; uniform r: " in proc.stdout, proc.stdout


def test_train_with_r_min_zero_drops_modules_from_the_adapter(workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "run_drop"
    fimlora(*_train_args(workspace, out, "--method", "fim", "--max-steps", "3", "--r-min", "0",
                         "--budget-ranks", "3", "--normalize", "none"))  # fmt: skip
    ranks = json.loads((out / "rank_map.json").read_text())["ranks"]
    kept = sorted(n for n, r in ranks.items() if r > 0)
    assert sum(ranks.values()) == 3 and len(kept) < len(ranks)
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == kept
    tensors = load_file(out / "adapter/adapter_model.safetensors")
    assert sum(k.endswith("lora_A.weight") for k in tensors) == len(kept)


def test_sft_train_and_multiple_choice_eval(workspace: dict[str, Path]) -> None:
    root = workspace["root"]
    out = root / "run_sft"
    fimlora("train", "--model", workspace["llama"], "--task", "sft", "--data", workspace["sft"], "--eval-data", workspace["sft"],
            "--method", "fim", "--r", "4", "--batch-size", "4", "--max-steps", "4", "--calibration-batches", "2",
            "--out", out, *FAST)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["tokens"] > 0 and metrics["eval"]["loss"] > 0
    mc = fimlora("eval", out, "--data", workspace["mc"], "--task", "multiple_choice", "--device", "cpu")
    result = json.loads(mc.stdout)
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1 and 0 <= result["accuracy_norm"] <= 1


# ---- errors: one line, exit 2, nothing written -----------------------------------------------------


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_model", "does not exist"),
        ("missing_column", "no column 'sentence'"),
        ("unknown_label", "not among label_names"),
        ("empty_file", "empty"),
        ("existing_out", "already exists"),
        ("unwritable_out", "not a directory"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_write_nothing(
    workspace: dict[str, Path], tmp_path: Path, case: str, expected: str
) -> None:
    ws = workspace
    out = tmp_path / "out"
    args = _train_args(ws, out, "--max-steps", "1")
    if case == "missing_model":
        args[args.index("--model") + 1] = tmp_path / "no_such_model"
    elif case == "missing_column":
        args += ["--text-column", "sentence"]
    elif case == "unknown_label":
        args += ["--label-names", "positive", "negative"]
    elif case == "empty_file":
        (tmp_path / "empty.csv").write_text("")
        args[args.index("--data") + 1] = tmp_path / "empty.csv"
    elif case == "existing_out":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "unwritable_out":
        (tmp_path / "a_file").write_text("")
        args[args.index("--out") + 1] = tmp_path / "a_file" / "out"
    before = _listing(tmp_path)
    proc = fimlora(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fimlora: error: "), proc.stderr
    assert expected in lines[0]
    assert _listing(tmp_path) == before
    if case == "existing_out":
        assert (out / "keep.txt").read_text() == "precious"


# ---- resume after SIGKILL --------------------------------------------------------------------------


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_resume_after_kill_gives_the_same_adapter(workspace: dict[str, Path], tmp_path: Path) -> None:
    ws = workspace
    steps = [
        "--method",
        "fim",
        "--max-steps",
        "300",
        "--checkpoint-every",
        "5",
        "--batch-size",
        "4",
        "--lora-dropout",
        "0.1",
    ]
    reference = tmp_path / "reference"
    fimlora(*_train_args(ws, reference, *steps))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fimlora.cli", *map(str, _train_args(ws, out, *steps))]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / ".killed.partial" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpt_dir / "latest").exists():
        assert proc.poll() is None, "training finished before a checkpoint could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing published; the partial run holds the checkpoint
    killed_at = (ckpt_dir / "latest").read_text()

    restart = fimlora(*_train_args(ws, out, *steps), check=False)  # without --resume: refuse, say how
    assert restart.returncode == 2 and "--resume" in restart.stderr

    fimlora(*_train_args(ws, out, *steps, "--resume"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and metrics["resumed_from"] >= 5, killed_at
    a, b = _adapter(reference), _adapter(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    ref_losses = [loss for _, loss in json.loads((reference / "history.json").read_text())["losses"]]
    losses = [loss for _, loss in json.loads((out / "history.json").read_text())["losses"]]
    assert losses == pytest.approx(ref_losses, abs=1e-6)
