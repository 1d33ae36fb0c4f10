"""Multi-process calibration: all-reduced statistics equal a single process's on the union of the shards.

Two CPU processes (gloo) each calibrate on their own half of 8 fixed batches (T = 4 each). Because
``fimlora.calibration`` all-reduces the raw sums (sum g, sum g^2, batch counts) before dividing, the result must
equal one process calibrating on all 8 batches (T = 8), including the variance E[g^2] - E[g]^2 of the
union, and must give the same rank map. ``torch.multiprocessing.spawn`` is used rather than ``torchrun``:
it needs no console script and starts in a few seconds on two cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.processes import free_port
from helpers.tiny_models import VOCAB, tiny_llama
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel

from fimlora import FimConfig, ModuleStats, estimate_module_scores, initialize_lora_fim_ranks
from fimlora.initialize import plan_rank_map

WORLD = 2
BATCHES = 8
LORA_R = 4


def _model(seed: int = 0) -> torch.nn.Module:
    """Tiny random LLaMA with LoRA on all linear layers; identical in every process for one seed."""
    base = tiny_llama(seed)
    # Seeded again so LoRA-A is the same whatever the base model consumed from the RNG.
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=8, target_modules="all-linear"))


def _batches() -> list[dict[str, torch.Tensor]]:
    """8 fixed batches of 2 x 16 tokens (labels = inputs, the causal-LM loss)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(BATCHES):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _config(batches: int) -> FimConfig:
    return FimConfig(calibration_batches=batches, show_progress=False, score="variance")


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One process: calibrate on this rank's shard; rank 0 writes the all-reduced statistics."""
    # Two processes on two cores: one thread each avoids oversubscription (and a slow, flaky test).
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        per_rank = BATCHES // WORLD
        shard = _batches()[rank * per_rank : (rank + 1) * per_rank]
        stats = estimate_module_scores(model, shard, _config(per_rank))
        # The same through a DDP wrapper, which estimate_module_scores unwraps (DDP's backward would
        # average the gradients over the two processes before fimlora sees them).
        ddp_stats = estimate_module_scores(DistributedDataParallel(model), shard, _config(per_rank))
        if rank == 0:
            stats.save_json(Path(out_dir) / "stats.json")
            ddp_stats.save_json(Path(out_dir) / "ddp_stats.json")
        # Leave together: a peer that tears gloo down early can make the other process abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The statistics files rank 0 wrote (both processes run once per module)."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def both_runs(dist_dir: Path) -> tuple[ModuleStats, ModuleStats]:
    distributed = ModuleStats.load_json(dist_dir / "stats.json")
    single = estimate_module_scores(_model(), _batches(), _config(BATCHES))
    return distributed, single


def test_ddp_wrapped_model_gives_the_same_statistics(dist_dir: Path) -> None:
    plain = ModuleStats.load_json(dist_dir / "stats.json")
    through_ddp = ModuleStats.load_json(dist_dir / "ddp_stats.json")
    assert through_ddp.world_size == WORLD and through_ddp.num_batches == BATCHES
    assert through_ddp.to_dict()["modules"] == plain.to_dict()["modules"]


def test_all_reduced_statistics_equal_single_process_union(
    both_runs: tuple[ModuleStats, ModuleStats],
) -> None:
    distributed, single = both_runs
    assert distributed.world_size == WORLD
    assert single.world_size == 1
    assert distributed.num_batches == single.num_batches == BATCHES
    assert list(distributed.modules) == list(single.modules)
    for name, d in distributed.modules.items():
        s = single.modules[name]
        assert (d.in_features, d.out_features, d.numel) == (s.in_features, s.out_features, s.numel)
        assert s.fisher_sum > 0 and s.variance_sum > 0, name
        assert _rel(d.fisher_sum, s.fisher_sum) <= 1e-6, name
        # Variance of the union, not the mean of per-shard variances (those differ by the spread of the
        # shard means): only reducing the raw sums before dividing gets this right.
        assert _rel(d.variance_sum, s.variance_sum) <= 1e-6, name


def test_all_reduced_statistics_give_identical_rank_maps(
    both_runs: tuple[ModuleStats, ModuleStats],
) -> None:
    distributed, single = both_runs
    for kind in ("fisher", "variance"):
        cfg = FimConfig(score=kind, show_progress=False)  # type: ignore[arg-type]
        planned = [
            dict(plan_rank_map(st.scores(kind, "mean"), st.shapes(), cfg, r=LORA_R))
            for st in (distributed, single)
        ]
        assert planned[0] == planned[1]
        applied = [dict(initialize_lora_fim_ranks(_model(), fim_config=cfg, scores=st)) for st in both_runs]
        assert applied[0] == applied[1] == planned[0]
        # Calibration on random data is not uniform: the test would be vacuous if every rank were r.
        assert len(set(planned[0].values())) > 1
