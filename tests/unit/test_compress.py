"""``fimlora.compress_adapter``: exact spectra from the factors, one global choice under the budget, and a
plain adapter that vanilla PEFT reloads (BERT with a trained classifier, GPT-2's Conv1D with patterns,
LLaMA with rsLoRA and patterns, AdaLoRA), never forming an ``out x in`` matrix."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny_models import ARCHS, batches
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model

from fimlora import compress_adapter
from fimlora.compress import balanced_factors, factor_svd, select_directions
from fimlora.errors import UsageError
from fimlora.peft_glue import lora_modules

# ---- the math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out", "fan_in", "r"), [(7, 5, 3), (5, 7, 8), (40, 30, 4), (3, 50, 6)])
def test_factor_svd_is_the_svd_of_the_product(out: int, fan_in: int, r: int) -> None:
    g = torch.Generator().manual_seed(out * 100 + r)
    a, b = torch.randn(r, fan_in, generator=g), torch.randn(out, r, generator=g)
    b[:, 0] = 0.0  # a rank-deficient B: one direction fewer
    spec = factor_svd(a, b, 0.7)
    dense = 0.7 * b.double() @ a.double()
    assert torch.allclose(spec.u @ torch.diag(spec.s) @ spec.vh, dense, atol=1e-10)
    expected = torch.linalg.svdvals(dense)
    n = spec.s.shape[0]
    assert n == min(out, fan_in, r)
    assert torch.allclose(spec.s, expected[:n], atol=1e-10)
    assert torch.allclose(spec.u.T @ spec.u, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(spec.vh @ spec.vh.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert math.isclose(spec.energy, float((dense**2).sum()), rel_tol=1e-10)


def test_balanced_factors_give_the_best_rank_k_approximation() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 20, generator=g), torch.randn(30, 6, generator=g)
    spec = factor_svd(a, b, 2.0)
    dense = 2.0 * b.double() @ a.double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    for k in (1, 3, 6):
        a_k, b_k = balanced_factors(spec, k, 0.25, dtype=torch.float64)
        assert a_k.shape == (k, 20) and b_k.shape == (30, k)
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert torch.allclose(0.25 * b_k @ a_k, best, atol=1e-9)
        assert torch.allclose(a_k.norm(dim=1), b_k.norm(dim=0), atol=1e-9)  # balanced
    with pytest.raises(ValueError, match="`k`"):
        balanced_factors(spec, 0, 1.0)


def _random_spectra(rng: random.Random, n_modules: int = 6) -> tuple[dict[str, list[float]], dict[str, int]]:
    spectra, costs = {}, {}
    for i in range(n_modules):
        r = rng.randint(1, 6)
        spectra[f"m{i}"] = sorted((rng.expovariate(1.0) for _ in range(r)), reverse=True)
        costs[f"m{i}"] = rng.choice([3, 5, 8, 13])
    return spectra, costs


def _kept(spectra: dict[str, list[float]], ranks: dict[str, int]) -> float:
    return math.fsum(v * v for n, k in ranks.items() for v in spectra[n][:k])


@pytest.mark.parametrize("seed", range(8))
def test_rank_budget_is_exact_and_keeps_the_largest_values(seed: int) -> None:
    spectra, costs = _random_spectra(random.Random(seed))
    total = sum(len(v) for v in spectra.values())
    everything = sorted((v * v for vs in spectra.values() for v in vs), reverse=True)
    for budget in range(0, total + 1):
        ranks = select_directions(spectra, costs, budget_ranks=budget)
        assert sum(ranks.values()) == budget
        assert math.isclose(
            _kept(spectra, ranks), math.fsum(everything[:budget]), rel_tol=1e-12, abs_tol=1e-12
        )
    with pytest.raises(ValueError, match="infeasible"):
        select_directions(spectra, costs, budget_ranks=total + 1)


@pytest.mark.parametrize("seed", range(8))
def test_parameter_budget_slack_monotone_energy_and_min_rank(seed: int) -> None:
    spectra, costs = _random_spectra(random.Random(seed))
    full = sum(len(v) * costs[n] for n, v in spectra.items())
    previous = -1.0
    for budget in range(0, full + 1):
        ranks = select_directions(spectra, costs, budget_params=budget)
        spent = sum(k * costs[n] for n, k in ranks.items())
        assert spent <= budget
        left_out = [costs[n] for n, k in ranks.items() if k < len(spectra[n])]
        assert not left_out or budget - spent < min(left_out)  # slack below one rank of any module left out
        energy = _kept(spectra, ranks)
        assert energy >= previous - 1e-12  # monotone in the budget
        previous = energy
    assert previous == pytest.approx(_kept(spectra, {n: len(v) for n, v in spectra.items()}))
    floor = sum(min(2, len(v)) * costs[n] for n, v in spectra.items())
    ranks = select_directions(spectra, costs, budget_params=floor, min_rank=2)
    assert all(k == min(2, len(spectra[n])) for n, k in ranks.items())
    with pytest.raises(ValueError, match="infeasible"):
        select_directions(spectra, costs, budget_params=floor - 1, min_rank=2)


def test_select_directions_prefers_energy_per_parameter() -> None:
    # One direction of energy 4 costing 10 parameters against two of energy 3 costing 4 each.
    spectra = {"wide": [2.0], "narrow": [math.sqrt(3), math.sqrt(3)]}
    costs = {"wide": 10, "narrow": 4}
    assert select_directions(spectra, costs, budget_params=10) == {"wide": 0, "narrow": 2}
    assert select_directions(spectra, costs, budget_ranks=1) == {"wide": 1, "narrow": 0}
    with pytest.raises(ValueError, match="exactly one"):
        select_directions(spectra, costs, budget_params=10, budget_ranks=1)
    with pytest.raises(ValueError, match="non-increasing"):
        select_directions({"m": [1.0, 2.0]}, {"m": 3}, budget_ranks=1)


# ---- adapters on disk -------------------------------------------------------------------------------

SETUPS: dict[str, dict[str, Any]] = {
    # BERT: query/key/value/dense (incl. the pooler), classifier trained as modules_to_save.
    "bert": {"r": 4, "lora_alpha": 8},
    # GPT-2: Conv1D (fan_in_fan_out) with patterns already present.
    "gpt2": {"r": 4, "lora_alpha": 8, "rank_pattern": {"c_attn": 6}, "alpha_pattern": {"c_fc": 3}},
    # LLaMA: rsLoRA with patterns.
    "llama": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"v_proj": 5},
    },
}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batches(arch, 1, seed=11)[0].items() if k != "labels"}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _trained_adapter(arch: str, root: Path) -> tuple[torch.nn.Module, Path, Path]:
    """A LoRA model with random, full-rank updates (B ~ N(0, 0.3)) and a changed classifier; saved."""
    build, kwargs = ARCHS[arch]
    base = build(0)
    base_dir = root / f"{arch}-base"
    base.save_pretrained(base_dir)  # before wrapping: PEFT injects layers in place
    model = get_peft_model(base, LoraConfig(**{**kwargs, **SETUPS[arch]}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in lora_modules(model).values():
            w = module.lora_B["default"].weight
            w.copy_(0.3 * torch.randn(w.shape, generator=g))
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    adapter_dir = root / f"{arch}-adapter"
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


# Runs in a fresh interpreter that never imports fimlora: vanilla PEFT loads every job's adapter.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from peft import PeftModel
    jobs = json.loads(sys.argv[1])
    ranks = {}
    for job in jobs:
        auto = AutoModelForSequenceClassification if job["kind"] == "seq_cls" else AutoModelForCausalLM
        model = PeftModel.from_pretrained(auto.from_pretrained(job["base"]), job["adapter"]).eval()
        with torch.no_grad():
            torch.save(model(**torch.load(job["inputs"])).logits, job["out"])
        ranks[job["out"]] = {
            n: int(m.lora_A["default"].weight.shape[0])
            for n, m in model.base_model.model.named_modules()
            if "default" in getattr(m, "lora_A", {})
        }
    print(json.dumps({"ranks": ranks, "fimlora_imported": "fimlora" in sys.modules}))
    """
)


@pytest.fixture(scope="module")
def full_budget(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each arch compressed at fraction 1.0 and reloaded by vanilla PEFT in one fresh process."""
    root = tmp_path_factory.mktemp("compress")
    cases, jobs = {}, []
    for arch in SETUPS:
        model, base_dir, adapter_dir = _trained_adapter(arch, root)
        inputs = _inputs(arch)
        expected = _logits(model, inputs)
        base_logits = _logits(ARCHS[arch][0](0), inputs)
        report = compress_adapter(adapter_dir, root / f"{arch}-full", fraction=1.0, plot=False)
        torch.save(inputs, root / f"{arch}-inputs.pt")
        out = str(root / f"{arch}-logits.pt")
        kind = "seq_cls" if arch == "bert" else "causal"
        jobs.append(
            {
                "base": str(base_dir),
                "adapter": str(report.adapter_dir),
                "inputs": str(root / f"{arch}-inputs.pt"),
                "out": out,
                "kind": kind,
            }  # fmt: skip
        )
        cases[arch] = {
            "expected": expected,
            "base": base_logits,
            "report": report,
            "out": out,
            "model": model,
        }
        cases[arch].update(adapter_dir=adapter_dir, base_dir=base_dir)
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(jobs)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["fimlora_imported"] is False
    for case in cases.values():
        case["got"] = torch.load(case["out"])
        case["reloaded_ranks"] = info["ranks"][case["out"]]
    return cases


@pytest.mark.parametrize("arch", list(SETUPS))
def test_full_budget_reproduces_the_logits_in_vanilla_peft(full_budget: dict[str, Any], arch: str) -> None:
    case = full_budget[arch]
    report = case["report"]
    assert (case["expected"] - case["base"]).abs().max().item() > 1e-2  # the adapter matters
    assert (case["got"] - case["expected"]).abs().max().item() <= 1e-5
    assert case["reloaded_ranks"] == report.ranks  # every module, at its full rank
    assert report.ranks == {n: m.source_rank for n, m in report.modules.items()}
    assert report.kept_energy_fraction == pytest.approx(1.0, abs=1e-12)
    assert report.lora_params == report.source_lora_params


def test_patterns_rslora_and_modules_to_save_are_honoured(full_budget: dict[str, Any]) -> None:
    llama, gpt2, bert = (full_budget[a]["report"] for a in ("llama", "gpt2", "bert"))
    assert {n.rsplit(".", 1)[-1]: m.source_rank for n, m in llama.modules.items()}["q_proj"] == 2
    assert {n.rsplit(".", 1)[-1]: m.source_rank for n, m in gpt2.modules.items()}["c_attn"] == 6
    assert llama.source["use_rslora"] is True
    config = json.loads((bert.adapter_dir / "adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"]
    from safetensors.torch import load_file

    src = load_file(str(full_budget["bert"]["adapter_dir"] / "adapter_model.safetensors"))
    out = load_file(str(bert.adapter_dir / "adapter_model.safetensors"))
    carried = [k for k in src if ".lora_" not in k]
    assert carried and all(torch.equal(src[k], out[k]) for k in carried)


def _dense_updates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module -> its update ``scale * B @ A`` (tiny models only: this forms the out x in matrix)."""
    out = {}
    for name, m in lora_modules(model).items():
        a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        out[name] = m.scaling["default"] * b @ a
    return out


@pytest.mark.parametrize("arch", list(SETUPS))
def test_half_budget_keeps_the_best_directions_and_drops_empty_modules(
    full_budget: dict[str, Any], tmp_path: Path, arch: str
) -> None:
    case = full_budget[arch]
    report = compress_adapter(case["adapter_dir"], tmp_path / "half", fraction=0.5)
    assert report.lora_params <= report.source_lora_params // 2
    original = _dense_updates(case["model"])
    base = ARCHS[arch][0](0)
    reloaded = PeftModel.from_pretrained(base, str(report.adapter_dir))
    got = _dense_updates(reloaded)
    kept = {n for n, k in report.ranks.items() if k > 0}
    assert set(got) == kept
    for name, delta in original.items():
        k = report.ranks[name]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        assert report.modules[name].kept_fraction == pytest.approx(float((s[:k] ** 2).sum() / (s**2).sum()))
        if k:
            best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
            assert (got[name] - best).abs().max().item() <= 1e-5 * max(1.0, delta.abs().max().item())


def test_energy_is_monotone_and_the_budget_is_met(full_budget: dict[str, Any]) -> None:
    adapter_dir = full_budget["llama"]["adapter_dir"]
    previous = -1.0
    for step in range(1, 21):
        fraction = step / 20
        report = compress_adapter(adapter_dir, None, fraction=fraction)
        budget = math.floor(fraction * report.source_lora_params)
        assert report.budget["params"] == budget and report.lora_params <= budget
        growable = [m.in_features + m.out_features for m in report.modules.values() if m.rank < len(m.singular_values)]  # fmt: skip
        assert not growable or budget - report.lora_params < min(growable)
        assert report.kept_energy_fraction >= previous - 1e-12
        previous = report.kept_energy_fraction
    total = sum(m.source_rank for m in report.modules.values())
    everything = sorted((v * v for m in report.modules.values() for v in m.singular_values), reverse=True)
    for budget_ranks in (1, total // 3, total):
        report = compress_adapter(adapter_dir, None, budget_ranks=budget_ranks)
        assert sum(report.ranks.values()) == budget_ranks
        kept = math.fsum(m.kept_energy for m in report.modules.values())
        assert kept == pytest.approx(math.fsum(everything[:budget_ranks]), rel=1e-9)


def test_a_model_and_its_saved_directory_compress_alike(full_budget: dict[str, Any], tmp_path: Path) -> None:
    case = full_budget["gpt2"]
    from_model = compress_adapter(case["model"], tmp_path / "m", fraction=0.4)
    from_dir = compress_adapter(case["adapter_dir"], tmp_path / "d", fraction=0.4)
    assert from_model.ranks == from_dir.ranks and len(set(from_model.ranks.values())) > 1
    for name in ("compression.json", "compression.md", "compression.png", "run.json", "config.json"):
        assert (tmp_path / "m" / name).is_file()
    record = json.loads((tmp_path / "m" / "run.json").read_text())
    assert record["kind"] == "compress" and "git" in record and "versions" in record


def test_adalora_is_converted_then_compressed(tmp_path: Path) -> None:
    build = ARCHS["gpt2"][0]
    base_dir = tmp_path / "base"
    build(0).save_pretrained(base_dir)
    config = AdaLoraConfig(
        init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, lora_alpha=16,
        target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
    )  # fmt: skip
    model = get_peft_model(build(0), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_(0.0, 1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step, batch in enumerate(batches("gpt2", 6, seed=3)):
        model(**batch).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    ada_dir = tmp_path / "adalora"
    model.save_pretrained(ada_dir)
    assert json.loads((ada_dir / "adapter_config.json").read_text())["rank_pattern"]  # pruned on the way
    inputs = _inputs("gpt2")
    expected = _logits(PeftModel.from_pretrained(build(0), str(ada_dir)), inputs)
    assert (expected - _logits(build(0), inputs)).abs().max().item() > 1e-3
    report = compress_adapter(ada_dir, tmp_path / "out", fraction=1.0)
    assert report.source["peft_type"] == "ADALORA"
    got = _logits(PeftModel.from_pretrained(build(0), str(report.adapter_dir)), inputs)
    assert (got - expected).abs().max().item() <= 1e-5


# ---- refusals ---------------------------------------------------------------------------------------


def _saved(tmp_path: Path, config: Any, name: str) -> Path:
    model = get_peft_model(ARCHS["llama"][0](0), config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_what_cannot_be_represented_exactly_is_refused(tmp_path: Path) -> None:
    targets = ["q_proj", "v_proj"]
    dora = _saved(tmp_path, LoraConfig(r=2, target_modules=targets, use_dora=True), "dora")
    with pytest.raises(UsageError, match="DoRA"):
        compress_adapter(dora, tmp_path / "o", fraction=0.5)
    ia3 = _saved(tmp_path, IA3Config(target_modules=targets, feedforward_modules=[]), "ia3")
    with pytest.raises(UsageError, match="IA3 adapter"):
        compress_adapter(ia3, tmp_path / "o", fraction=0.5)
    bias = _saved(tmp_path, LoraConfig(r=2, target_modules=targets, lora_bias=True), "bias")
    with pytest.raises(UsageError, match="lora_bias"):
        compress_adapter(bias, tmp_path / "o", fraction=0.5)
    plain = _saved(tmp_path, LoraConfig(r=2, target_modules=targets), "plain")
    pissa = tmp_path / "pissa"
    pissa.mkdir()
    (pissa / "adapter_model.safetensors").write_bytes((plain / "adapter_model.safetensors").read_bytes())
    config = json.loads((plain / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    with pytest.raises(UsageError, match="rewrites the base weights"):
        compress_adapter(pissa, tmp_path / "o", fraction=0.5)
    with pytest.raises(UsageError, match="not a PEFT adapter directory"):
        compress_adapter(tmp_path, tmp_path / "o", fraction=0.5)
    for kwargs in ({}, {"fraction": 0.5, "budget_params": 10}, {"fraction": 0.0}, {"fraction": 1.5}):
        with pytest.raises(UsageError):
            compress_adapter(plain, tmp_path / "o", **kwargs)
    with pytest.raises(UsageError, match="infeasible"):
        compress_adapter(plain, tmp_path / "o", budget_params=10, min_rank=1)
    with pytest.raises(UsageError, match="already exists"):
        compress_adapter(plain, dora, fraction=0.5)  # a non-empty output without overwrite
    assert not (tmp_path / "o").exists()


# ---- memory: never an out x in matrix ---------------------------------------------------------------


def _allocations(fn: Any) -> tuple[int, int]:
    """The largest allocation of one aten operator, and the largest outside any operator, during ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ops = [int(e.cpu_memory_usage) for e in prof.events() if e.name.startswith("aten::")]
    other = [int(e.cpu_memory_usage) for e in prof.events() if not e.name.startswith("aten::")]
    return max(ops, default=0), max(other, default=0)


def test_a_1p5b_shaped_adapter_compresses_without_any_out_by_in_allocation(tmp_path: Path) -> None:
    from bench.perf.common import SHAPES
    from bench.perf.compress_time import llama_module_shapes, write_random_adapter

    shapes = llama_module_shapes(SHAPES["1.5b"])  # hidden 2048, MLP 8192, 16 layers, GQA 8 of 32 heads
    source = write_random_adapter(tmp_path / "source", shapes, 16)
    smallest = min(i * o for i, o in shapes.values()) * 4  # k_proj: 2048 x 512 in fp32, 4 MiB
    reports = []
    largest_op, outside = _allocations(
        lambda: reports.append(compress_adapter(source, tmp_path / "out", fraction=0.5, plot=False))
    )
    assert len(reports[0].modules) == 7 * 16 and reports[0].lora_params <= reports[0].source_lora_params // 2
    # Every operator of the compression allocates far less than the smallest out x in matrix, and the only
    # allocation outside an operator is safetensors reading the file.
    assert largest_op < smallest / 2
    assert outside <= (source / "adapter_model.safetensors").stat().st_size
    # The positive control: forming one module's product is seen.
    fan_in, fan_out = shapes["model.layers.0.self_attn.k_proj"]
    a, b = torch.randn(16, fan_in), torch.randn(fan_out, 16)
    assert _allocations(lambda: b @ a)[0] >= smallest


def test_cli_compress_writes_the_adapter_and_the_report(
    full_budget: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fimlora.cli import main

    out = tmp_path / "small"
    adapter = str(full_budget["llama"]["adapter_dir"])
    assert main(["compress", adapter, "--budget-params", "1.5k", "--min-rank", "1", "--out", str(out)]) == 0
    assert "energy kept" in capsys.readouterr().out
    record = json.loads((out / "compression.json").read_text())
    assert record["summary"]["lora_params"] <= 1500
    assert all(m["rank"] >= 1 for m in record["modules"].values())  # --min-rank 1: nothing dropped
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "compression.md").is_file()
    assert main(["compress", adapter, "--budget-ranks", "5", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "compression.json").read_text())["summary"]["total_rank"] == 5


def test_equal_directions_are_spread_over_modules_not_given_to_the_first() -> None:
    from fimlora.compress.spectrum import select_directions

    flat = {name: [1.0] * 4 for name in ("a", "b", "c")}
    assert select_directions(flat, {}, budget_ranks=6) == {"a": 2, "b": 2, "c": 2}
    assert select_directions(flat, dict.fromkeys(flat, 10), budget_params=70) == {"a": 3, "b": 2, "c": 2}
