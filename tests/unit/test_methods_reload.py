"""Every method's final adapter is standard LoRA: a fresh process with only torch/transformers/peft loads it
and reproduces the logits (one subprocess checks all six, to keep the suite fast)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers.tiny_models import ARCHS, batches
from peft import LoraConfig

from fimlora.methods import available_methods, get_method

STEPS = 6
OPTIONS = {
    "fim": {"calibration_batches": 2, "show_progress": False},
    "l1ra": {"l1_lambda": 0.5, "gate_lr": 0.2, "reallocate_every": 2, "prune_threshold": 0.3},
    "lrlora": {"cutoff_lr": 0.3, "truncate_at": 0.5},
    "adalora": {"tinit": 1, "tfinal": 2},
}
"""Options that make a method change something within a few steps (prune, reallocate, calibrate on what
there is); every other registered method runs with its defaults: the test is driven by the registry."""
METHODS = available_methods()

_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    worst = {}
    for name in json.loads(open(f"{root}/methods.json").read()):
        base = AutoModelForCausalLM.from_pretrained(f"{root}/base")
        model = PeftModel.from_pretrained(base, f"{root}/{name}").eval()
        data = torch.load(f"{root}/{name}/expected.pt")
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"]).logits
        worst[name] = float((logits - data["logits"]).abs().max())
    print(json.dumps(worst))
    """
)


def _train(name: str) -> tuple[torch.nn.Module, dict]:
    build, kwargs = ARCHS["llama"]
    method = get_method(name, **OPTIONS.get(name, {}))
    data = batches("llama", STEPS)
    torch.manual_seed(0)
    model = method.prepare(
        build(0), LoraConfig(r=4, lora_alpha=8, **kwargs), calibration_batches=iter(data), total_steps=STEPS
    )
    opt = torch.optim.AdamW(method.param_groups(model, lr=2e-2))
    for step, batch in enumerate(data):
        loss = model(**batch).loss
        penalty = method.penalty(model)
        (loss if penalty is None else loss + penalty).backward()
        opt.step()
        opt.zero_grad()
        method.on_step_end(model, step, opt)
    model, rank_map = method.finalize(model)
    return model, dict(rank_map)


def test_every_method_reloads_with_plain_peft_in_a_fresh_process(tmp_path: Path) -> None:
    build, _ = ARCHS["llama"]
    build(0).save_pretrained(tmp_path / "base")
    input_ids = batches("llama", 1, seed=5)[0]["input_ids"]
    for name in METHODS:
        model, ranks = _train(name)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        model.save_pretrained(tmp_path / name)
        torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / name / "expected.pt")
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA", name
    (tmp_path / "methods.json").write_text(json.dumps(METHODS))
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    worst = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(worst) == set(METHODS)
    assert all(v <= 1e-5 for v in worst.values()), worst
