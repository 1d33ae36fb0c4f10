"""FIM-LoRA for a model that fits only sharded: calibrate under FSDP2, build at the ranks, shard, train.

Run with ``torchrun`` (the script shards with ``fully_shard`` itself) or ``accelerate launch`` with an FSDP2
config (``accelerator.prepare`` shards)::

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_fim_lora.py --model DIR --out out/fsdp2
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/fsdp2_fim_lora.py \\
        --model DIR --out out/fsdp2 --accelerate

The flow (docs/sharded.md):

1. every process builds the base model with a uniform LoRA adapter (B = 0), shards it, and calibrates on its
   own micro-batches (``estimate_module_scores``: statistics all-reduced, each micro-batch one calibration
   batch); every process then plans the same rank map;
2. the map becomes a ``LoraConfig`` with ``rank_pattern``/``alpha_pattern`` (``lora_config_with_ranks``);
   a fresh base model is wrapped with it (``get_peft_model``) at those ranks, sharded, trained;
3. the adapter is saved from the sharded model: the full state dict is gathered (``get_model_state_dict``,
   or ``accelerator.get_state_dict``) and the main process calls ``save_pretrained(..., state_dict=...)``.
   Vanilla PEFT loads it: ``PeftModel.from_pretrained(base, OUT/adapter)``.

Data: ``--texts FILE`` (one training text per line) or, without it, random token ids (a smoke test).
Writes ``OUT/rank_map.json``, ``OUT/scores.json`` (the all-reduced statistics), ``OUT/lora_config.json``,
``OUT/adapter/`` and ``OUT/logits.pt`` (the trained sharded model's logits on the first batch, for
checking a reload).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fimlora import FimConfig, estimate_module_scores, lora_config_with_ranks
from fimlora.initialize import plan_rank_map
from fimlora.peft_glue import lora_config_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local Hugging Face causal-LM directory or hub id")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--accelerate", action="store_true", help="shard with accelerator.prepare (accelerate launch)"
    )
    p.add_argument("--texts", help="text file, one training example per line (default: random token ids)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the uniform adapter calibrated")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--calibration-batches", type=int, default=4, help="micro-batches per process")
    p.add_argument("--steps", type=int, default=3, help="training steps per process")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def batches(args: argparse.Namespace, rank: int, world: int, n: int) -> list[dict[str, torch.Tensor]]:
    """This process's ``n`` micro-batches: examples ``rank, rank + world, ...`` of the data."""
    if args.texts:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        lines = [line for line in Path(args.texts).read_text().splitlines() if line.strip()]
        mine = lines[rank::world]
        out = []
        for i in range(n):
            chunk = [mine[(i * args.batch_size + j) % len(mine)] for j in range(args.batch_size)]
            enc = tokenizer(
                chunk, return_tensors="pt", padding="max_length", truncation=True, max_length=args.seq_len
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            out.append(
                {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
            )
        return out
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    vocab = _vocab_size(args.model)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _vocab_size(model: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).vocab_size)


def shard(model: torch.nn.Module, accelerator: Any) -> Any:
    """FSDP2: ``accelerator.prepare`` under ``accelerate launch``, else ``fully_shard`` per decoder layer."""
    if accelerator is not None:
        return accelerator.prepare(model)
    from torch.distributed.fsdp import fully_shard

    layer_cls = tuple(type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    for module in list(model.modules()):
        if layer_cls and isinstance(module, layer_cls):
            fully_shard(module)
    fully_shard(model)
    return model


def full_state_dict(model: torch.nn.Module, accelerator: Any) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict, gathered by every process."""
    if accelerator is not None:
        return accelerator.get_state_dict(model)  # type: ignore[no-any-return]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator()
        if not getattr(accelerator, "is_fsdp2", False):
            # accelerate (checked: 1.15) turns its FSDP plugin on only for GPUs and other accelerators; on a
            # CPU-only machine it runs plain DDP (`use_cpu: true`) or one process alone: nothing is sharded.
            raise SystemExit(
                f"accelerate did not enable FSDP2 (distributed_type={accelerator.distributed_type}): its FSDP "
                "plugin is enabled only on GPUs/accelerators, not on CPU; on CPU run this script with torchrun"
            )
    else:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    out = Path(args.out)
    base_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear")
    cfg = FimConfig(calibration_batches=args.calibration_batches, show_progress=False)
    data = [
        {k: v.to(device) for k, v in b.items()}
        for b in batches(args, rank, world, max(args.calibration_batches, args.steps))
    ]

    # 1. Calibrate the sharded model with a uniform adapter (same seed everywhere: the same LoRA-A).
    torch.manual_seed(args.seed)
    model = shard(get_peft_model(AutoModelForCausalLM.from_pretrained(args.model), base_config), accelerator)
    stats = estimate_module_scores(model, data[: args.calibration_batches], cfg)
    rank_map = plan_rank_map(stats.scores(cfg.score, cfg.aggregation), stats.shapes(), cfg, r=args.lora_r)
    config = lora_config_with_ranks(base_config, rank_map, model=model)
    del model
    if accelerator is not None:
        accelerator.free_memory()

    # 2. A fresh model built at the ranks, sharded, trained.
    torch.manual_seed(args.seed + 1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model), config)
    if accelerator is None:  # shard first: fully_shard replaces the parameters by their shards
        model = shard(model, None)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    else:  # accelerate's documented order for FSDP2: prepare model and optimizer together
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for step in range(args.steps):
        loss = model(**data[step]).loss
        loss.backward() if accelerator is None else accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    # 3. Save from the sharded model: every process gathers, the main process writes.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data[0]["input_ids"]).logits
    state = full_state_dict(model, accelerator)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        rank_map.save_json(out / "rank_map.json")
        stats.save_json(out / "scores.json")  # world_size and metadata["gradients"] == "layer": sharded path
        (out / "lora_config.json").write_text(json.dumps(lora_config_dict(config), indent=2))
        unwrapped = model if accelerator is None else accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out / "adapter", state_dict=state)
        torch.save({"input_ids": data[0]["input_ids"].cpu(), "logits": logits.cpu()}, out / "logits.pt")
        print(f"ranks {dict(rank_map)}\nwrote {out}/adapter", flush=True)
    dist.barrier()
    if accelerator is not None:
        accelerator.end_training()
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
