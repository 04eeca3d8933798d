"""The step-profile script (benchmarks/distill_profile.py) end to end on the CPU with tiny models, and its kernel
buckets on CUDA kernel names. Checks the report's shape and sanity, never a timing."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_profile.py"


@pytest.fixture(scope="module")
def profiler():
    spec = importlib.util.spec_from_file_location("distill_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_smoke_run_reports_every_part_of_every_configuration(profiler, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TMCONVERT_SCAN_BACKEND", raising=False)
    out = tmp_path / "profile.json"
    argv = ["--smoke", "--device", "cpu", "--students", "vim-t,vim-s", "--img-sizes", "32,16", "--json", str(out)]
    returned = profiler.main(argv)
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["meta"] == json.loads(json.dumps(returned["meta"]))

    meta = report["meta"]
    assert meta["card"] == "cpu" and meta["batch"] == 4 and meta["torch"] and meta["triton"]
    assert meta["scan_backend_resolved"] == "reference"

    configurations = {(r["student"], r["img_size"]) for r in report["results"]}
    assert configurations == {("vim-t", 32), ("vim-s", 32), ("vim-t", 16), ("vim-s", 16)}
    for result in report["results"]:
        assert "error" not in result
        assert result["graph_step"] is None  # no CUDA graphs on the CPU
        assert _positive(result["eager_step"]["ms"]) and _positive(result["eager_step"]["img_per_s"])
        assert len(result["eager_step"]["ms_all"]) == 2
        parts = result["parts"]["ms"]
        assert set(parts) == set(profiler.PARTS)
        assert all(_positive(v) for v in parts.values()), parts
        assert math.isclose(result["parts"]["sum_ms"], sum(parts.values()))

        kernels = result["kernels"]
        assert kernels["source"] == "cpu operators"
        assert set(kernels["kinds"]) == set(profiler.KIND_NAMES)
        assert _positive(kernels["total_ms"])
        assert sum(k["percent"] for k in kernels["kinds"].values()) == pytest.approx(100.0, abs=0.1)
        assert all(k["ms"] >= 0 and math.isfinite(k["ms"]) for k in kernels["kinds"].values())

        data = result["data"]
        assert _positive(data["img_per_s"]) and _positive(data["ratio"])
        assert data["image_shape"] == [3, result["img_size"], result["img_size"]]

        assert f"### {result['student']}, {result['img_size']} px" in printed
    assert "### summary" in printed and "| vim-s | 16 |" in printed


def test_cuda_kernel_names_land_in_their_kinds(profiler):
    kind = profiler.kernel_kind
    assert kind("selective_scan_fwd_kernel", True) == "selective scan"
    assert kind("selective_scan_bwd_kernel", True) == "selective scan"
    assert kind("void at::native::conv_depthwise2d_forward_kernel<1, float>(...)", True) == "causal conv"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", True) == "GEMM"
    assert kind("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT", True) == "GEMM"
    assert kind("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>(...)", True) == "GEMM"
    assert kind("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>(...)", True) == "norms"
    assert kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<LpNormFunctor>", True) == (
        "optimizer"
    )
    assert kind("Memcpy DtoD (Device -> Device)", True) == "copies / casts"
    assert kind("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", True) == "copies / casts"
    assert kind("void at::native::vectorized_elementwise_kernel<4, silu_kernel>", True) == profiler.OTHER_KIND

    table = profiler.bucket_times([("selective_scan_fwd_kernel", 300.0), ("gemm", 600.0), ("exp", 100.0)], 2, True)
    assert table["total_ms"] == pytest.approx(0.5)
    assert table["kinds"]["selective scan"] == {"ms": pytest.approx(0.15), "percent": pytest.approx(30.0)}
    assert sum(k["percent"] for k in table["kinds"].values()) == pytest.approx(100.0)
