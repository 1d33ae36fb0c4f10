"""The documented FSDP2 flow through its launchers: ``torchrun`` and ``accelerate launch`` (FSDP2 plugin).

``examples/fsdp2_fim_lora.py`` calibrates a sharded tiny LLaMA on two CPU processes (gloo), builds a fresh
model at the ranks, shards it (``fully_shard`` itself under torchrun; ``accelerator.prepare`` with
``examples/accelerate_fsdp2.yaml``), trains, and saves from the sharded model. A fresh interpreter with
vanilla PEFT reloads the adapter at the allocated ranks and must reproduce the sharded model's logits; both
launchers must calibrate to the same rank map (calibration happens before training, on the same batches).

accelerate enables its FSDP plugin only for GPUs and other accelerators (``AcceleratorState`` sets
``DistributedType.FSDP`` only in its multi-GPU/NPU/XPU branch; on CPU it gives ``MULTI_CPU``, i.e. DDP, with
``use_cpu``, else one process alone). Without two GPUs the accelerate case therefore checks that the
example refuses to run unsharded, with that explanation, instead of silently calibrating without sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import make_tiny_llama

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
SCRIPT_ARGS = ["--lora-r", "4", "--lora-alpha", "8", "--calibration-batches", "3", "--steps", "3"]

_RELOAD = """
import json, sys
from pathlib import Path
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
saved = torch.load(out / "logits.pt")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
with torch.no_grad():
    logits = model(input_ids=saved["input_ids"]).logits
ranks = {n: int(m.r["default"]) for n, m in model.base_model.model.named_modules()
         if isinstance(getattr(m, "r", None), dict) and "default" in m.r}
print(json.dumps({"max_abs_diff": (logits - saved["logits"]).abs().max().item(), "ranks": ranks}))
assert "fimlora" not in sys.modules
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("fsdp2") / "llama")


def _run(kind: str, model_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    script = [str(ROOT / "examples" / "fsdp2_fim_lora.py"), "--model", str(model_dir), "--out", str(out)]
    if kind == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *script, *SCRIPT_ARGS]
    else:
        config = str(ROOT / "examples" / "accelerate_fsdp2.yaml")
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            config,
            *script,
            "--accelerate",
            *SCRIPT_ARGS,
        ]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)


def _launch(kind: str, model_dir: Path, out: Path) -> dict:
    proc = _run(kind, model_dir, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reload = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(model_dir), str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert reload.returncode == 0, reload.stderr[-4000:]
    return json.loads(reload.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def launched(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("launches")
    return {kind: (root / kind, _launch(kind, model_dir, root / kind)) for kind in KINDS}


KINDS = ("torchrun", "accelerate") if torch.cuda.device_count() >= 2 else ("torchrun",)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_flow_reloads_in_vanilla_peft(kind: str, launched: dict[str, tuple[Path, dict]]) -> None:
    out, reload = launched[kind]
    rank_map = json.loads((out / "rank_map.json").read_text())["ranks"]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["world_size"] == 2 and scores["num_batches"] == 6
    assert scores["metadata"]["gradients"] == "layer"  # calibrated sharded, from the layers' gradients
    assert len(set(rank_map.values())) > 1
    assert reload["ranks"] == rank_map
    assert reload["max_abs_diff"] <= 1e-5


@pytest.mark.skipif(len(KINDS) < 2, reason="accelerate's FSDP plugin needs GPUs")
def test_both_launchers_calibrate_to_the_same_map(launched: dict[str, tuple[Path, dict]]) -> None:
    maps = [json.loads((out / "rank_map.json").read_text())["ranks"] for out, _ in launched.values()]
    assert maps[0] == maps[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_accelerate_on_cpu_refuses_instead_of_running_unsharded(model_dir: Path, tmp_path: Path) -> None:
    proc = _run("accelerate", model_dir, tmp_path / "out")
    assert proc.returncode != 0
    assert "accelerate did not enable FSDP2" in proc.stderr and "torchrun" in proc.stderr
    assert not (tmp_path / "out").exists()
