"""The EVA patch (budget_unit="params") refuses PEFT versions it was not written for, before patching."""

from __future__ import annotations

from collections import Counter
from importlib import metadata

import pytest
from helpers.tiny_models import ARCHS, batches
from peft import LoraConfig

from fimlora.errors import UsageError
from fimlora.methods import get_method
from fimlora.peft_glue.eva import EVA_PATCH_PEFT_VERSIONS, CostWeightedEvaRanks, check_eva_patch_supported


def _installed(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    real = metadata.version

    def fake(name: str) -> str:
        if name != "peft":
            return real(name)
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", fake)


@pytest.mark.parametrize("version", ["0.15.0", "0.20.1", "0.21.2", "0.22.0", "0.22.1.dev0"])
def test_supported_versions_pass(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    _installed(monkeypatch, version)
    check_eva_patch_supported()


@pytest.mark.parametrize("version", ["0.14.0", "0.23.0", "0.23.0.dev0", "1.0.0", "not-a-version", None])
def test_other_versions_fail_with_one_line_naming_both_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, version: str | None
) -> None:
    _installed(monkeypatch, version)
    with pytest.raises(UsageError) as err:
        check_eva_patch_supported()
    message = str(err.value)
    assert "\n" not in message
    assert f"peft {version if version is not None else 'unknown'} is installed" in message
    assert EVA_PATCH_PEFT_VERSIONS in message
    assert "budget_unit='ranks'" in message and "pip install" in message


def test_the_installed_peft_is_supported() -> None:
    check_eva_patch_supported()  # the version the patch was tested with; a failure here means: re-check it


def test_nothing_is_patched_on_an_unsupported_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import eva

    _installed(monkeypatch, "0.23.0")
    selection = CostWeightedEvaRanks({"a": 2}, budget=4, most=2)
    with pytest.raises(UsageError, match="0.23.0"), selection.installed():
        pass
    assert eva.Counter is Counter


def test_eva_params_fails_before_wrapping_on_an_unsupported_version(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, "0.23.0")
    build, kwargs = ARCHS["llama"]
    base = build(0)
    with pytest.raises(UsageError, match="budget_unit='ranks'"):
        get_method("eva", budget_unit="params").prepare(
            base, LoraConfig(r=4, **kwargs), calibration_batches=batches("llama", 2)
        )
    assert not hasattr(base, "peft_config")  # the model was not wrapped
