"""The decoder gate end to end in seconds: synthetic catalogs, a tiny random LLaMA, the real run function."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tiny_models import WORDS, make_tiny_llama

from bench.decoder_gate.maps import module_kind
from bench.decoder_gate.mo_files import write_mo
from bench.decoder_gate.pairs import PairsMismatchError, pin_record
from bench.decoder_gate.protocol import make_spec, prompt_of
from bench.decoder_gate.sft_run import GateRunner, GateSetup, encode_pairs
from bench.harness import ResultStore, run_grid


def _by_stem(paths):
    return {p: p.stem for p in paths}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> GateSetup:
    root = tmp_path_factory.mktemp("gate")
    model = make_tiny_llama(root / "llama")
    locale = root / "de"
    locale.mkdir()
    for k in range(8):  # eight "programs" of word-level messages the tiny tokenizer knows
        messages = {}
        for i in range(30):
            words = [WORDS[(k * 7 + i * j) % len(WORDS)] for j in range(1, 4)]
            messages[f"{' '.join(words)} {WORDS[k]}"] = " ".join(reversed(words))
        write_mo(locale / f"prog{k}.mo", messages)
    base = GateSetup(
        model=str(model),
        locale_dir=locale,
        owners=_by_stem,
        pinned={},
        checkpoint_root=root / "ckpt",
        heldout_pairs=40,
        max_heldout_package=40,
        dev_eval_pairs=12,
        test_eval_pairs=12,
        test_decodes=3,
        max_new_tokens=4,
    )
    base.pinned = pin_record(GateRunner(base).pairs(check=False))
    return base


def _spec(method="uniform", rank=2, seed=0, **over):
    return make_spec(method, rank, seed, {"steps": 3, "batch_size": 4, "lr": 1e-3, "phase": "gate", **over})


def test_only_target_tokens_carry_loss(setup):
    runner = GateRunner(setup)
    tok = runner.tokenizer()
    pairs = runner.pairs().train[:5]
    for pair, row in zip(pairs, encode_pairs(pairs, tok), strict=True):
        n_prompt = len(tok(prompt_of(pair.source))["input_ids"])
        assert row["labels"][:n_prompt] == [-100] * n_prompt
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        assert row["labels"][-1] == tok.eos_token_id
        assert (
            len(row["labels"]) - n_prompt == len(tok(pair.target, add_special_tokens=False)["input_ids"]) + 1
        )


def test_runs_record_losses_chrf_and_equal_parameter_counts(setup, tmp_path):
    store = ResultStore(tmp_path / "store")
    specs = [
        _spec(map="uniform"),
        _spec("random", map="random", map_seed=0),
        _spec("random", map="random", map_seed=1),
        _spec(map="mlp"),
        _spec(map="attention"),
        _spec(phase="lr", map="uniform", lr=3e-3),
        make_spec("uniform", 2, 0, {"steps": 0, "phase": "gate", "map": "uniform"}),  # the base model
    ]
    summary = run_grid(specs, GateRunner(setup), store, progress=False, stop_on_error=True)
    assert len(summary.completed) == len(specs)
    records = {r["run_id"]: r for r in store.records()}
    by_spec = [records[s.run_id] for s in specs]
    uniform, random0, random1, mlp, attention, lr_run, base = by_spec
    p_uniform = uniform["extra"]["budget_check"]["uniform_lora_params"]
    for rec in (uniform, random0, random1, mlp, attention):
        check = rec["extra"]["budget_check"]
        assert check["uniform_lora_params"] == p_uniform
        assert rec["trainable_params"] == check["lora_params"] <= p_uniform
        assert 0 <= check["slack"] < 64 + 32  # under the cheapest module's cost per rank (in + out)
        assert rec["metrics"]["test_loss"] > 0 and 0 <= rec["metrics"]["test_chrf"] <= 100
        assert rec["provenance"]["git"] is not None
    assert random0["extra"]["rank_map"] != random1["extra"]["rank_map"]  # map seeds draw different maps
    for rec, kind in ((mlp, "mlp"), (attention, "attention")):
        ranks = rec["extra"]["rank_map"]
        assert all((r > 0) == (module_kind(n) == kind) for n, r in ranks.items())
    assert "test_loss" not in lr_run["metrics"] and "dev_loss" in lr_run["metrics"]  # lr runs never read test
    assert base["trainable_params"] == 0 and base["metrics"]["dev_loss"] != uniform["metrics"]["dev_loss"]
    # resumable: a second sweep finds everything done
    again = run_grid(specs, GateRunner(setup), store, progress=False)
    assert again.completed == [] and len(again.skipped) == len(specs)


def test_a_run_refuses_pairs_that_differ_from_the_pin(setup):
    pinned = {k: {**v, "sha256": "0" * 64} for k, v in setup.pinned.items()}
    runner = GateRunner(GateSetup(**{**setup.__dict__, "pinned": pinned}))
    with pytest.raises(PairsMismatchError, match="differ from the pinned"):
        runner(_spec())


def test_the_split_holds_whole_programs(setup):
    pairs = GateRunner(setup).pairs()
    held = {p.catalog for p in pairs.dev + pairs.test}
    assert held and not held & {p.catalog for p in pairs.train}
    assert Path(setup.model).is_dir()
