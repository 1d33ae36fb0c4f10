"""DeepSpeed ZeRO-3: calibration of ``engine.module`` equals one unsharded process on the union of batches.

Two CPU processes (``DS_ACCELERATOR=cpu``, gloo) partition a tiny random LLaMA with LoRA under ZeRO-3 and
calibrate ``engine.module`` on their own halves of 8 batches. ZeRO-3 leaves B's ``.grad`` partitioned, so
fimlora forms each B gradient from its ``lora_B`` layer's input and output gradient (as for FSDP2); the
all-reduced statistics must equal one process's on all 8 batches (relative difference <= 1e-6). Resizing
the partitioned model stays refused.

DeepSpeed is not a fimlora dependency: the test is skipped without it. It ran with deepspeed 0.19.8
installed ``--no-deps`` (plus hjson, py-cpuinfo, ninja, msgpack, einops) next to torch 2.13.0 CPU; see
docs/sharded.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import VOCAB, tiny_llama
from peft import LoraConfig, get_peft_model

from fimlora import FimConfig, ModuleStats, estimate_module_scores

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]

_WORKER = """
import json, sys
from pathlib import Path
import deepspeed, torch
sys.path.insert(0, sys.argv[2])
from test_deepspeed_zero3 import _batches, _config, _model
from fimlora import apply_rank_map, estimate_module_scores
from fimlora.peft_glue import is_sharded

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
model = _model()
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
)
inner = engine.module
record = {"partitioned": next(inner.parameters()).numel() == 0, "is_sharded": is_sharded(inner)}
stats = estimate_module_scores(inner, _batches()[rank * 4 : (rank + 1) * 4], _config(4))
try:
    apply_rank_map(inner, dict.fromkeys(stats.modules, 2))
except TypeError as e:
    record["refusal"] = str(e)
if rank == 0:
    stats.save_json(Path(sys.argv[1]) / "stats.json")
    (Path(sys.argv[1]) / "record.json").write_text(json.dumps(record))
torch.distributed.barrier()
"""


def _model() -> torch.nn.Module:
    base = tiny_llama(0)
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(8):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _config(batches: int) -> FimConfig:
    return FimConfig(calibration_batches=batches, show_progress=False, score="variance")


def test_zero3_statistics_equal_single_process_union(tmp_path: Path) -> None:
    import json

    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--no-python", sys.executable, "-c", _WORKER, str(tmp_path), str(Path(__file__).parent)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["partitioned"] and record["is_sharded"]
    assert "lora_config_with_ranks" in record["refusal"]
    zero3 = ModuleStats.load_json(tmp_path / "stats.json")
    single = estimate_module_scores(_model(), _batches(), _config(8))
    assert zero3.world_size == 2 and zero3.num_batches == single.num_batches == 8
    assert zero3.metadata["gradients"] == "layer"
    for name, s in single.modules.items():
        d = zero3.modules[name]
        assert abs(d.fisher_sum - s.fisher_sum) <= 1e-6 * s.fisher_sum, name
        assert abs(d.variance_sum - s.variance_sum) <= 1e-6 * s.variance_sum, name
