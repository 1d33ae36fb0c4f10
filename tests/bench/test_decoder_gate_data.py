"""The decoder gate's data and bookkeeping: .mo reading, usable pairs, split by package, pin, chrF, LR rule."""

from __future__ import annotations

import gettext
import random
from pathlib import Path

import pytest

from bench.decoder_gate.chrf import corpus_chrf
from bench.decoder_gate.maps import check_equal_params, subset_rank_map
from bench.decoder_gate.mo_files import MoFormatError, read_mo, write_mo
from bench.decoder_gate.pairs import (
    SPLITS,
    PairsMismatchError,
    check_pinned,
    extract_pairs,
    pin_record,
    split_packages,
    usable_text_pair,
)
from bench.decoder_gate.protocol import LR_GRID, STEPS, choose_lr, extension_rate


def _words(text: str) -> int:
    return len(text.split())


def _by_stem(paths):
    return {p: p.stem.split("-")[0] for p in paths}


def _small(root: Path) -> dict:
    return {"locale_dir": root, "owners": _by_stem, "heldout_pairs": 80, "max_heldout_package": 60}


def write_catalogs(root: Path, n_packages: int = 12, per_package: int = 40) -> Path:
    """Catalogs ``pkgN-main.mo`` / ``pkgN-extra.mo``: two per package, some sources shared across packages."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_packages):
        main = {f"message {k} number {i}": f"Nachricht {k} Nummer {i}" for i in range(per_package)}
        main["Cancel"] = "Abbrechen"  # in every package: must land in one split only
        main["%s: %s"] = "%s: %s"  # no letter, identical
        main["Same"] = "Same"  # identical
        main["file\x00files"] = "Datei\x00Dateien"  # plural
        main["menu\x04Open"] = "Öffnen"  # context: kept, without it
        write_mo(root / f"pkg{k}-main.mo", main)
        write_mo(root / f"pkg{k}-extra.mo", {f"extra {k}": f"Extra {k}"}, charset="ISO-8859-1")
    return root


def test_write_mo_round_trips_through_gettext_and_read_mo(tmp_path):
    path = write_mo(tmp_path / "x.mo", {"Open": "Öffnen", "ctx\x04Close": "Schließen", "a\x00b": "A\x00B"})
    with path.open("rb") as fh:
        translations = gettext.GNUTranslations(fh)
    assert translations.gettext("Open") == "Öffnen"
    assert translations.pgettext("ctx", "Close") == "Schließen"
    assert translations.ngettext("a", "b", 2) == "B"
    entries = {e.msgid: e for e in read_mo(path)}
    assert entries["Close"].context == "ctx" and entries["Close"].msgstr == "Schließen"
    assert entries["a"].plural and not entries["Open"].plural


def test_read_mo_decodes_the_header_charset_and_refuses_other_files(tmp_path):
    latin = write_mo(tmp_path / "l.mo", {"Size": "Größe"}, charset="ISO-8859-1")
    assert "Größe".encode("latin-1") in latin.read_bytes()
    assert read_mo(latin)[0].msgstr == "Größe"
    (tmp_path / "bad.mo").write_bytes(b"not a catalog at all")
    with pytest.raises(MoFormatError, match="magic"):
        read_mo(tmp_path / "bad.mo")


def test_usable_pairs():
    assert usable_text_pair(" Open ", "Öffnen\n", plural=False) == ("Open", "Öffnen")
    assert usable_text_pair("Open", "Open", plural=False) is None
    assert usable_text_pair("%s: %d", "%s: %d x", plural=False) is None
    assert usable_text_pair("file", "Datei", plural=True) is None
    assert usable_text_pair("Open", "  ", plural=False) is None


def test_split_is_by_package_disjoint_deduplicated_and_deterministic(tmp_path):
    root = write_catalogs(tmp_path / "de")
    pairs = extract_pairs(_words, **_small(root))
    again = extract_pairs(_words, **_small(root))
    assert pin_record(pairs) == pin_record(again)
    packages = {name: {p.package for p in pairs.split(name)} for name in SPLITS}
    assert all(packages[name] for name in SPLITS)
    assert not (packages["train"] & packages["dev"] or packages["train"] & packages["test"])
    assert not packages["dev"] & packages["test"]
    sources = [p.source for name in SPLITS for p in pairs.split(name)]
    assert len(sources) == len(set(sources))  # "Cancel" once, in the first split that has it
    assert "Cancel" in {p.source for p in pairs.train}
    assert "Open" in sources and "Same" not in sources and "file" not in sources
    assert any(p.target == "Extra 0" for name in SPLITS for p in pairs.split(name))  # Latin-1 catalog read
    # both catalogs of a package go to the same split
    for name in SPLITS:
        for p in pairs.split(name):
            assert p.catalog.split("-")[0] == p.package


def test_split_packages_keeps_large_packages_in_train():
    sizes = {f"p{i}": 400 for i in range(20)} | {"huge": 100_000}
    split = split_packages(sizes)
    assert "huge" in split["train"]
    assert sum(sizes[p] for p in split["test"]) >= 1500 and sum(sizes[p] for p in split["dev"]) >= 1500
    assert sorted(p for s in SPLITS for p in split[s]) == sorted(sizes)


def test_a_hash_mismatch_is_refused_with_one_line_naming_cause_and_fix(tmp_path):
    root = write_catalogs(tmp_path / "de")
    pairs = extract_pairs(_words, **_small(root))
    pin = pin_record(pairs)
    check_pinned(pairs, pin)  # matches: no error
    write_mo(root / "pkg3-main.mo", {"message 3 number 0": "Nachricht drei"})  # a package changed
    changed = extract_pairs(_words, **_small(root))
    with pytest.raises(PairsMismatchError) as err:
        check_pinned(changed, pin)
    text = str(err.value)
    assert "\n" not in text and "Debian packages" in text and "fix:" in text


def test_chrf_known_values():
    assert corpus_chrf(["Datei öffnen"], ["Datei öffnen"]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0
    # "ab" vs "abc": P1 = 1, R1 = 2/3; P2 = 1, R2 = 1/2; order 3 has no hypothesis n-gram.
    # chrP = 1, chrR = 7/12, chrF2 = 5 * 7/12 / (4 + 7/12) = 35/55
    assert corpus_chrf(["ab"], ["abc"]) == pytest.approx(100 * 35 / 55)
    with pytest.raises(ValueError):
        corpus_chrf(["a"], [])


def _smollm2_shapes() -> dict[str, tuple[int, int]]:
    shapes = {}
    for layer in range(30):
        for name, shape in {
            "self_attn.q_proj": (576, 576),
            "self_attn.k_proj": (576, 192),
            "self_attn.v_proj": (576, 192),
            "self_attn.o_proj": (576, 576),
            "mlp.gate_proj": (576, 1536),
            "mlp.up_proj": (576, 1536),
            "mlp.down_proj": (1536, 576),
        }.items():
            shapes[f"model.layers.{layer}.{name}"] = shape
    return shapes


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_subset_maps_spend_uniform_r2s_parameters_on_one_kind(kind):
    shapes = _smollm2_shapes()
    rank_map = subset_rank_map(shapes, 2, kind)
    check = check_equal_params(rank_map, shapes, 2)
    assert check["uniform_lora_params"] == 610_560
    assert 0 <= check["slack"] < 768
    kept = {n for n, r in rank_map.items() if r > 0}
    assert kept and all(("mlp" in n) == (kind == "mlp") for n in kept)
    assert max(rank_map[n] for n in kept) - min(rank_map[n] for n in kept) <= 1


def test_check_equal_params_refuses_over_and_under_spending():
    shapes = _smollm2_shapes()
    uniform = dict.fromkeys(shapes, 2)
    assert check_equal_params(uniform, shapes, 2)["slack"] == 0
    with pytest.raises(ValueError, match="unequal parameter budget"):
        check_equal_params({**uniform, "model.layers.0.mlp.up_proj": 3}, shapes, 2)
    with pytest.raises(ValueError, match="unequal parameter budget"):
        check_equal_params({**uniform, "model.layers.0.mlp.up_proj": 1}, shapes, 2)


def test_learning_rate_choice_and_edge_extension():
    records = [
        {"status": "ok", "spec": {"suite": "decoder-gate", "budget": "r2", "overrides": o}, "metrics": m}
        for o, m in [
            ({"phase": "lr", "lr": 3e-4, "steps": STEPS}, {"dev_loss": 2.5}),
            ({"phase": "lr", "lr": 1e-3, "steps": STEPS}, {"dev_loss": 2.1}),
            ({"phase": "lr", "lr": 3e-3, "steps": STEPS}, {"dev_loss": 2.0}),
            ({"phase": "gate", "lr": 1e-2, "steps": STEPS}, {"dev_loss": 1.0}),  # not a selection run
        ]
    ]
    best, losses = choose_lr(records, 2)
    assert best == 3e-3 and len(losses) == len(LR_GRID)
    assert extension_rate(losses) == pytest.approx(9.5e-3)
    assert extension_rate({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0}) == pytest.approx(9.5e-5)
    assert extension_rate({3e-4: 2.0, 1e-3: 1.0, 3e-3: 3.0}) is None
    assert extension_rate({1e-4: 1.0, 3e-4: 2.0, 1e-3: 3.0, 3e-3: 4.0}) is None  # extended once already


def _gate_record(kind, rank, seed, loss, map_seed=0):
    over = {"phase": "gate", "map": kind, "map_seed": map_seed}
    spec = {"method": kind, "budget": f"r{rank}", "seed": seed, "overrides": over}
    return {"status": "ok", "spec": spec, "metrics": {"test_loss": loss}}


def _gate_records(r1_gap: float, map_shift: float) -> list[dict]:
    recs = []
    for seed, noise in ((1, 0.004), (2, -0.004)):
        for rank, base in ((1, 2.0 + r1_gap), (2, 2.0 + r1_gap / 2), (8, 2.0), (32, 2.0)):
            recs.append(_gate_record("uniform", rank, seed, base + noise))
        for m in range(3):
            recs.append(_gate_record("random", 2, seed, 2.0 + r1_gap / 2 + noise + 0.001 * m, map_seed=m))
        recs.append(_gate_record("mlp", 2, seed, 2.0 + r1_gap / 2 + noise - map_shift))
        recs.append(_gate_record("attention", 2, seed, 2.0 + r1_gap / 2 + noise + map_shift))
    return recs


def test_gate_verdict_passes_and_fails_on_each_criterion():
    from bench.decoder_gate.criteria import gate_verdict

    passing = gate_verdict(_gate_records(r1_gap=0.2, map_shift=0.1))
    assert passing["passed"] is True and passing["sd_seed"] == pytest.approx(0.004 * 2**0.5)
    small_gap = gate_verdict(_gate_records(r1_gap=0.03, map_shift=0.1))
    assert small_gap["criteria"]["gap >= 0.05 nats"] is False and small_gap["passed"] is False
    noisy = _gate_records(r1_gap=0.2, map_shift=0.1)
    for rec in noisy:
        if rec["spec"]["budget"] == "r8":
            rec["metrics"]["test_loss"] += 0.05 * (1 if rec["spec"]["seed"] == 1 else -1)
    assert gate_verdict(noisy)["criteria"]["gap >= 10 sd"] is False
    rng = random.Random(1)
    same = _gate_records(r1_gap=0.2, map_shift=0.0)
    for rec in same:  # run-to-run noise (10x the maps' 0.001 offsets) that a seed does not fix
        rec["metrics"]["test_loss"] += rng.gauss(0.0, 0.01)
    same_maps = gate_verdict(same)
    assert same_maps["criteria"]["maps at r2 differ (p < 0.05)"] is False
    assert gate_verdict(_gate_records(0.2, 0.1)[:4])["passed"] is None  # runs missing: no verdict
