"""bench.suites.bigbench_fetch on a small synthetic sdist, and the decoder suite's BIG-bench reading."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from bench.suites.bigbench_fetch import BigbenchFetchError, fetch_bigbench_tasks, main
from bench.suites.decoder import bigbench_prompt, load_mc_examples

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def _task(name: str, **fields: object) -> bytes:
    example = {"input": f"{name} question?", "target_scores": {"yes": 1, "no": 0}}
    return json.dumps({"name": name, "examples": [example], **fields}).encode()


def _sdist(tmp_path: Path) -> tuple[Path, str]:
    """A tar.gz laid out like bigbench-1.0.0.tar.gz, and its sha256."""
    members = {
        f"{ROOT}/alpha/task.json": _task("alpha"),
        f"{ROOT}/alpha/README.md": b"not extracted",
        f"{ROOT}/beta/task.json": json.dumps({"name": "beta"}).encode(),
        f"{ROOT}/beta/one/task.json": _task("one"),
        f"{ROOT}/beta/two/task.json": _task("two", example_output_prefix="\nAnswer: "),
        f"{ROOT}/gamma/task.json": _task("gamma"),
        "bigbench-1.0.0/setup.py": b"",
    }
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_extracts_only_the_requested_tasks(tmp_path):
    sdist, sha = _sdist(tmp_path)
    dest = tmp_path / "tasks"
    assert fetch_bigbench_tasks(["alpha", "beta"], dest, sdist=sdist, sha256=sha) == dest
    assert _files(dest) == ["alpha/task.json", "beta/one/task.json", "beta/task.json", "beta/two/task.json"]
    assert json.loads((dest / "alpha" / "task.json").read_text())["name"] == "alpha"


def test_checksum_mismatch_raises_and_extracts_nothing(tmp_path):
    sdist, _ = _sdist(tmp_path)
    dest = tmp_path / "tasks"
    with pytest.raises(BigbenchFetchError, match="sha256"):
        fetch_bigbench_tasks(["alpha"], dest, sdist=sdist, sha256="0" * 64)
    assert _files(dest) == []


def test_idempotent_and_force(tmp_path):
    sdist, sha = _sdist(tmp_path)
    dest = tmp_path / "tasks"
    fetch_bigbench_tasks(["alpha"], dest, sdist=sdist, sha256=sha)
    (dest / "alpha" / "task.json").write_text("{}")
    # Already there: the archive is not opened again (a missing --sdist is not even an error).
    fetch_bigbench_tasks(["alpha"], dest, sdist=tmp_path / "absent.tar.gz", sha256=sha)
    assert (dest / "alpha" / "task.json").read_text() == "{}"
    fetch_bigbench_tasks(["alpha"], dest, sdist=sdist, sha256=sha, force=True)
    assert json.loads((dest / "alpha" / "task.json").read_text())["name"] == "alpha"
    assert _files(dest) == ["alpha/task.json"]  # no staging or temporary files left behind


def test_task_missing_from_archive_raises(tmp_path):
    sdist, sha = _sdist(tmp_path)
    with pytest.raises(BigbenchFetchError, match="nope"):
        fetch_bigbench_tasks(["alpha", "nope"], tmp_path / "tasks", sdist=sdist, sha256=sha)
    assert not (tmp_path / "tasks" / "alpha").exists()  # all or nothing


def test_task_names_are_plain_folder_names(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        fetch_bigbench_tasks(["../etc"], tmp_path / "tasks", sdist=tmp_path / "x.tar.gz")


def test_download_path_through_a_file_url(tmp_path):
    # A file:// URL exercises the urllib download, checksum and cleanup without the network.
    sdist, sha = _sdist(tmp_path)
    dest = tmp_path / "cache" / "tasks"
    fetch_bigbench_tasks(["gamma"], dest, url=sdist.as_uri(), sha256=sha)
    assert _files(tmp_path / "cache") == ["tasks/gamma/task.json"]  # the downloaded sdist is deleted


def test_download_failure_names_the_fix(tmp_path, capsys):
    url = (tmp_path / "absent.tar.gz").as_uri()
    with pytest.raises(BigbenchFetchError, match="--sdist PATH"):
        fetch_bigbench_tasks(["alpha"], tmp_path / "tasks", url=url)
    assert main(["--dest", str(tmp_path / "tasks"), "--tasks", "alpha", "--url", url]) == 1
    assert "--sdist PATH" in capsys.readouterr().err


def test_decoder_reads_tasks_and_subtasks_in_bigbench_prompt_format(tmp_path):
    sdist, sha = _sdist(tmp_path)
    dest = fetch_bigbench_tasks(["alpha", "beta"], tmp_path / "tasks", sdist=sdist, sha256=sha)
    alpha = load_mc_examples("alpha", {"bigbench_dir": str(dest)})
    assert alpha == [{"input": "Q: alpha question?\nA:", "choices": ["yes", "no"], "answer": 0}]
    beta = load_mc_examples("beta", {"bigbench_dir": str(dest)})
    assert [ex["input"] for ex in beta] == ["Q: one question?\nA:", "Q: two question?\nAnswer:"]


def test_bigbench_prompt_strips_outer_whitespace():
    task = {"example_input_prefix": "\n", "example_output_prefix": "\nThe above reasoning is "}
    assert bigbench_prompt(task, " It rains. ") == "It rains.\nThe above reasoning is"


def test_decoder_missing_data_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench.suites.bigbench_fetch --tasks winowhy"):
        load_mc_examples("winowhy", {"bigbench_dir": str(tmp_path)})
