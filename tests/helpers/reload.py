"""Reload a saved adapter in a fresh interpreter that imports only torch, transformers and PEFT (never
fimlora): the proof that an adapter is standard."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# Runs in a fresh interpreter that never imports fimlora.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from peft import PeftModel
    base_dir, adapter_dir, inputs_path, out_path, kind = sys.argv[1:6]
    assert "fimlora" not in sys.modules
    auto = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    base = auto.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(**inputs).logits
    ranks = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            ranks[name] = int(module.lora_A["default"].weight.shape[0])
    torch.save(logits, out_path)
    print(json.dumps({"ranks": ranks, "fimlora_imported": "fimlora" in sys.modules}))
    """
)


def reload_in_fresh_process(tmp: Path, base_dir: Path, adapter_dir: Path, inputs: dict, kind: str):
    """``(logits, {module: rank})`` of ``base_dir`` + ``adapter_dir`` on ``inputs`` (``kind``: "seq_cls" or
    "causal"), computed in a fresh process."""
    inputs_path, out_path = tmp / "inputs.pt", tmp / "logits.pt"
    torch.save(inputs, inputs_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD_SCRIPT,
            str(base_dir),
            str(adapter_dir),
            str(inputs_path),
            str(out_path),
            kind,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["fimlora_imported"] is False
    return torch.load(out_path), info["ranks"]
