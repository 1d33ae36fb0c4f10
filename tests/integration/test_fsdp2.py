"""FSDP2 (``fully_shard``): sharded calibration equals one process on the union, then the whole flow.

Two CPU processes (gloo) shard a tiny random LLaMA with LoRA (every decoder layer, then the root) and
calibrate, each on its own half of 8 fixed batches (T = 4 each). B's ``.grad`` is a process-averaged shard
under FSDP2, so fimlora forms each B gradient from its ``lora_B`` layer's input and output gradient; the
all-reduced statistics must equal one unsharded process calibrating on all 8 batches (T = 8), and give the
same rank maps. Then the flow of docs/sharded.md: the map becomes a ``LoraConfig`` with patterns
(``lora_config_with_ranks``), a fresh model is built with it, sharded, trained for a few steps and saved
from the sharded model (full state dict gathered, as ``accelerator.get_state_dict`` does); a fresh
process with vanilla PEFT (no fimlora) reloads the adapter at the allocated ranks and must reproduce the
sharded model's logits. Resizing a sharded model stays refused, with an error naming that flow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.processes import free_port
from helpers.tiny_models import VOCAB, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from fimlora import (
    FimConfig,
    ModuleStats,
    apply_rank_map,
    estimate_module_scores,
    fim_calibration,
    initialize_lora_fim_ranks,
    lora_config_with_ranks,
)
from fimlora.initialize import plan_rank_map
from fimlora.peft_glue import current_ranks, is_sharded, pattern_key

# ~30 s on an idle 2-core machine (two processes, then a fresh interpreter for the reload): opt-in.
pytestmark = pytest.mark.integration
pytest.importorskip("torch.distributed.fsdp")

WORLD = 2
BATCHES = 8
LORA_R = 4
TRAIN_STEPS = 3


def _lora_config() -> LoraConfig:
    return LoraConfig(r=LORA_R, lora_alpha=8, target_modules="all-linear")


def _model(base_dir: Path) -> torch.nn.Module:
    """The saved tiny LLaMA with a fresh uniform LoRA adapter; identical in every process."""
    base = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)  # LoRA-A
    return get_peft_model(base, _lora_config())


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _batches() -> list[dict[str, torch.Tensor]]:
    """8 fixed batches of 2 x 16 tokens (labels = inputs, the causal-LM loss)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(BATCHES):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(99))


def _config(batches: int) -> FimConfig:
    return FimConfig(calibration_batches=batches, show_progress=False, score="variance")


def _refusals(model: torch.nn.Module, stats: ModuleStats) -> dict[str, str]:
    """The errors of what stays refused on a sharded model (resizing its LoRA layers)."""
    errors = {}
    attempts = {
        "initialize_lora_fim_ranks": lambda: initialize_lora_fim_ranks(
            model, fim_config=_config(4), scores=stats
        ),
        "apply_rank_map": lambda: apply_rank_map(model, dict.fromkeys(stats.modules, 2)),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
        except TypeError as e:
            errors[name] = str(e)
    return errors


def _worker(rank: int, port: int, root: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = Path(root)
    try:
        per_rank = BATCHES // WORLD
        shard = _batches()[rank * per_rank : (rank + 1) * per_rank]
        # 1. Calibrate the sharded model, by the library's loop and by the user's own.
        model = _shard(_model(out / "base"))
        record: dict[str, Any] = {"is_sharded": is_sharded(model)}
        stats = estimate_module_scores(model, shard, _config(per_rank))
        with fim_calibration(model, _config(per_rank)) as cal:
            for batch in shard:
                model(**batch).loss.backward()
        record["refusals"] = _refusals(model, stats)
        # 2. The map as a LoraConfig, a fresh model at those ranks, sharded, trained, saved.
        rank_map = plan_rank_map(
            stats.scores("variance", "mean"), stats.shapes(), _config(per_rank), r=LORA_R
        )
        config = lora_config_with_ranks(_lora_config(), rank_map, model=model)
        del model
        torch.manual_seed(5)
        fresh = get_peft_model(LlamaForCausalLM.from_pretrained(out / "base"), config)
        record["built_ranks"] = current_ranks(fresh)
        fresh = _shard(fresh)
        optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
        fresh.train()
        for batch in shard[:TRAIN_STEPS]:
            fresh(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        fresh.eval()
        with torch.no_grad():
            logits = fresh(input_ids=_probe()).logits
        # Every process takes part in gathering the full state dict; the main process saves.
        state = get_model_state_dict(
            fresh, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        )
        record["rank_map"] = dict(rank_map)
        (out / f"record{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            stats.save_json(out / "stats.json")
            cal.scores.save_json(out / "loop_stats.json")
            fresh.save_pretrained(out / "adapter", state_dict=state)
            torch.save(logits, out / "sharded_logits.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


# Vanilla PEFT in a fresh interpreter: no fimlora import, nothing of the training processes.
_RELOAD = """
import json, sys
from pathlib import Path
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

root = Path(sys.argv[1])
probe = torch.load(root / "probe.pt")
base = LlamaForCausalLM.from_pretrained(root / "base").eval()
with torch.no_grad():
    base_logits = base(input_ids=probe).logits
model = PeftModel.from_pretrained(base, root / "adapter").eval()
with torch.no_grad():
    logits = model(input_ids=probe).logits
torch.save({"base": base_logits, "adapter": logits}, root / "reloaded_logits.pt")
ranks = {n: int(m.r["default"]) for n, m in model.base_model.model.named_modules()
         if isinstance(getattr(m, "r", None), dict) and "default" in m.r}
(root / "reloaded_ranks.json").write_text(json.dumps(ranks))
assert "fimlora" not in sys.modules
"""


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both processes run once per module; then the adapter is reloaded in a fresh process."""
    out = tmp_path_factory.mktemp("fsdp")
    tiny_llama(0).save_pretrained(out / "base")
    torch.save(_probe(), out / "probe.pt")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _RELOAD, str(out)], check=True, timeout=300, env=env)
    return out


@pytest.fixture(scope="module")
def records(fsdp_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((fsdp_dir / f"record{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def both_runs(fsdp_dir: Path) -> tuple[ModuleStats, ModuleStats]:
    sharded = ModuleStats.load_json(fsdp_dir / "stats.json")
    single = estimate_module_scores(_model(fsdp_dir / "base"), _batches(), _config(BATCHES))
    return sharded, single


def test_sharded_statistics_equal_single_process_union(both_runs: tuple[ModuleStats, ModuleStats]) -> None:
    sharded, single = both_runs
    assert sharded.world_size == WORLD and single.world_size == 1
    assert sharded.num_batches == single.num_batches == BATCHES
    assert sharded.metadata["gradients"] == "layer" and "gradients" not in single.metadata
    assert list(sharded.modules) == list(single.modules)
    for name, d in sharded.modules.items():
        s = single.modules[name]
        assert (d.in_features, d.out_features, d.numel) == (s.in_features, s.out_features, s.numel)
        assert s.fisher_sum > 0 and s.variance_sum > 0, name
        assert _rel(d.fisher_sum, s.fisher_sum) <= 1e-6, name
        assert _rel(d.variance_sum, s.variance_sum) <= 1e-6, name


def test_own_loop_on_sharded_model_counts_each_backward(fsdp_dir: Path) -> None:
    by_library = ModuleStats.load_json(fsdp_dir / "stats.json")
    by_own_loop = ModuleStats.load_json(fsdp_dir / "loop_stats.json")
    assert by_own_loop.num_batches == BATCHES and by_own_loop.world_size == WORLD
    for name, a in by_library.modules.items():
        b = by_own_loop.modules[name]
        assert _rel(a.fisher_sum, b.fisher_sum) <= 1e-6 and _rel(a.variance_sum, b.variance_sum) <= 1e-6


def test_sharded_statistics_give_identical_rank_maps(
    both_runs: tuple[ModuleStats, ModuleStats], records: list[dict[str, Any]]
) -> None:
    sharded, single = both_runs
    for kind in ("fisher", "variance"):
        cfg = FimConfig(score=kind, show_progress=False)  # type: ignore[arg-type]
        planned = [
            dict(plan_rank_map(st.scores(kind, "mean"), st.shapes(), cfg, r=LORA_R)) for st in both_runs
        ]
        assert planned[0] == planned[1]
        assert len(set(planned[0].values())) > 1  # not vacuous: calibration moved rank between modules
    # Every process planned the same map from its all-reduced statistics.
    assert records[0]["rank_map"] == records[1]["rank_map"]
    variance_map = dict(
        plan_rank_map(single.scores("variance", "mean"), single.shapes(), _config(4), r=LORA_R)
    )
    assert records[0]["rank_map"] == variance_map


def test_fresh_model_is_built_at_the_allocated_ranks(fsdp_dir: Path, records: list[dict[str, Any]]) -> None:
    rank_map = records[0]["rank_map"]
    assert records[0]["is_sharded"] and all(r["built_ranks"] == rank_map for r in records)
    saved = json.loads((fsdp_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {pattern_key(n): r for n, r in rank_map.items()}
    assert saved["alpha_pattern"] == {pattern_key(n): 2 * r for n, r in rank_map.items()}  # alpha/r = 8/4


def test_vanilla_peft_reload_reproduces_the_sharded_model(
    fsdp_dir: Path, records: list[dict[str, Any]]
) -> None:
    assert json.loads((fsdp_dir / "reloaded_ranks.json").read_text()) == records[0]["rank_map"]
    sharded = torch.load(fsdp_dir / "sharded_logits.pt")
    reloaded = torch.load(fsdp_dir / "reloaded_logits.pt")
    assert (reloaded["adapter"] - sharded).abs().max().item() <= 1e-5
    # Not vacuous: the trained adapter changes the logits well beyond that tolerance.
    assert (reloaded["adapter"] - reloaded["base"]).abs().max().item() > 1e-3


def test_resizing_a_sharded_model_is_refused_with_the_way_out(records: list[dict[str, Any]]) -> None:
    refusals = records[0]["refusals"]
    assert set(refusals) == {"initialize_lora_fim_ranks", "apply_rank_map"}
    for message in refusals.values():
        assert "sharded" in message and "lora_config_with_ranks" in message and "before sharding" in message
