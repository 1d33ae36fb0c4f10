"""warmstart under DDP (two CPU processes, gloo): every process warms up on its own shard with DDP averaging
the gradients, so every process holds the same weights, computes the same SVD and truncates to the same map
(the ``fim`` signal's statistics are all-reduced). The truncation changes the parameters, so the DDP wrapper
is rebuilt after it (DDP's buckets are made for the parameters it was built with), and training goes on in
step: at the end both processes hold the same adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.processes import free_port
from helpers.tiny_models import VOCAB, tiny_llama
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel

from fimlora.methods import get_method
from fimlora.peft_glue import current_ranks

WORLD, STEPS, WARMUP = 2, 4, 2


def _batches(rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # each process its own shard
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _worker(rank: int, port: int, out_dir: str, signal_name: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same base and adapter in every process
        method = get_method("warmstart", warmup=WARMUP, signal=signal_name, r_min=1, fim_batches=2)
        data = _batches(rank)
        model = method.prepare(
            tiny_llama(0),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            calibration_batches=data,
            total_steps=STEPS,
        )
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2))
        for step in range(STEPS):
            ddp(**data[step]).loss.backward()
            opt.step()
            opt.zero_grad()
            if method.on_step_end(model, step, opt) is not None:
                ddp = DistributedDataParallel(model)  # new parameters: a new wrapper
        model, rank_map = method.finalize(model)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, Path(out_dir) / f"weights{rank}.pt")
        (Path(out_dir) / f"ranks{rank}.json").write_text(json.dumps(current_ranks(model)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("signal_name", ["energy", "fim"])
def test_every_process_truncates_to_the_same_map_and_ends_with_the_same_adapter(
    tmp_path: Path, signal_name: str
) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path), signal_name), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"ranks{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1] and len(set(ranks[0].values())) > 1  # the same map, and not uniform
    weights = [torch.load(tmp_path / f"weights{r}.pt") for r in range(WORLD)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=1e-6, msg=name)
