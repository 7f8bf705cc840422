"""The CPU facts and the bf16 switch (jointcli/weights/device.py): no model needed."""

from __future__ import annotations

import pytest

from jointcli.errors import InputError
from jointcli.weights.device import BF16_SWITCH, cpu_budget, cpu_has_native_bf16, cpu_kind, resolve_dtype


def test_the_switch_forces_either_path(monkeypatch):
    import torch

    monkeypatch.setenv(BF16_SWITCH, "0")
    assert not cpu_has_native_bf16() and resolve_dtype("auto", "cpu") == torch.float32
    assert f"{BF16_SWITCH}=0" in cpu_kind()
    monkeypatch.setenv(BF16_SWITCH, "1")
    assert cpu_has_native_bf16() and resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32  # an explicit dtype is never overridden


def test_a_bad_switch_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(BF16_SWITCH, "yes")
    with pytest.raises(InputError, match=f"{BF16_SWITCH}='yes': use 0"):
        cpu_has_native_bf16()


def test_cpu_kind_names_the_vector_unit_and_cores(monkeypatch):
    monkeypatch.delenv(BF16_SWITCH, raising=False)
    kind = cpu_kind()
    assert kind.split(",")[0].split("+")[0] in ("avx512_bf16", "avx512f", "avx2", "other")
    assert f"{cpu_budget()} cores" in kind
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")
