"""The CPU facts and the bf16 switch (jointcli/weights/device.py): no model needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jointcli.errors import InputError
from jointcli.weights import device
from jointcli.weights.device import BF16_SWITCH, cpu_budget, cpu_has_native_bf16, cpu_kind, resolve_dtype

from .conftest import ROOT

# CPUs as /proc/cpuinfo describes them, and what cpu_kind and `dtype: auto` say of each
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
SAPPHIRE_RAPIDS = AVX512_BF16 | {"amx_tile", "amx_int8", "amx_bf16"}


def test_the_switch_forces_either_path(monkeypatch):
    import torch

    monkeypatch.setenv(BF16_SWITCH, "0")
    assert not cpu_has_native_bf16() and resolve_dtype("auto", "cpu") == torch.float32
    assert f"{BF16_SWITCH}=0" in cpu_kind()
    monkeypatch.setenv(BF16_SWITCH, "1")
    assert cpu_has_native_bf16() and resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32  # an explicit dtype is never overridden


@pytest.mark.parametrize(
    "flags, switch, dtype",
    [
        (AVX2_ONLY, None, "float32"),
        (AVX512, None, "float32"),
        (AVX512_BF16, None, "bfloat16"),
        (SAPPHIRE_RAPIDS, None, "bfloat16"),
        (SAPPHIRE_RAPIDS, "0", "float32"),  # the fp32 path on a bf16 CPU
        (AVX2_ONLY, "1", "bfloat16"),  # the bf16 path forced where it is emulated
    ],
)
def test_auto_dtype_on_cpu_follows_the_flags_unless_switched(monkeypatch, flags, switch, dtype):
    import torch

    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    if switch is None:
        monkeypatch.delenv(BF16_SWITCH, raising=False)
    else:
        monkeypatch.setenv(BF16_SWITCH, switch)
    assert resolve_dtype("auto", "cpu") == getattr(torch, dtype)
    assert cpu_has_native_bf16() == (dtype == "bfloat16")


def test_a_bad_switch_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(BF16_SWITCH, "yes")
    with pytest.raises(InputError, match=f"{BF16_SWITCH}='yes': use 0"):
        cpu_has_native_bf16()


@pytest.mark.parametrize(
    "flags, kind",
    [
        (frozenset(), "other"),
        (AVX2_ONLY, "avx2"),
        (AVX512, "avx512f"),
        (AVX512_BF16, "avx512_bf16"),
        (SAPPHIRE_RAPIDS, "avx512_bf16+amx"),
    ],
)
def test_cpu_kind_names_the_widest_vector_unit_and_the_cores(monkeypatch, flags, kind):
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    monkeypatch.setattr(device, "cpu_budget", lambda: 3)
    monkeypatch.delenv(BF16_SWITCH, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert cpu_kind() == f"{kind}, 3 cores"
    monkeypatch.setenv(BF16_SWITCH, "0")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert cpu_kind() == f"{kind}, 3 cores, {BF16_SWITCH}=0, ATEN_CPU_CAPABILITY=avx2"


def test_cpu_flags_are_the_first_flags_line_of_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    line = re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.MULTILINE)
    assert device.cpu_flags() == frozenset(line.group(1).split() if line else ())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
def test_cpu_budget_follows_the_affinity_mask():
    assert 1 <= cpu_budget() <= len(os.sched_getaffinity(0))
    one_cpu = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{one_cpu}}})\n"
        "from jointcli.weights.device import cpu_budget, cpu_kind\n"
        "print(cpu_budget(), cpu_kind().split(', ')[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "cores"]


def test_an_unknown_dtype_is_a_one_line_error():
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")
