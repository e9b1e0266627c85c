"""benchmarks/gpu_rates.py (the Python part of benchmarks/gpu.sh) runs on CPU with the tiny model, and
gpu.sh is valid bash."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.gpu_rates import main, peak_tflops

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("device_name", "bf16"),
    [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0)],
)  # fmt: skip
def test_peak_is_read_by_card_name(device_name, bf16):
    assert peak_tflops(device_name)["bf16"] == bf16


def test_unknown_card_has_no_peak():
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_quick_cpu_run_writes_every_rate(tmp_path, tiny_model_dir):
    out = tmp_path / "rates.json"
    argv = ["--device", "cpu", "--pairs", "64", "--model", str(tiny_model_dir), "--train-batch", "8"]
    main([*argv, "--train-steps", "2", "--score-batch", "32", "--max-length", "64", "--out", str(out)])
    rates = json.loads(out.read_text())
    assert rates["device"] == "cpu" and rates["pairs"] == 64
    assert rates["training"]["pairs_per_s"] > 0 and rates["scoring_fp32"]["pairs_per_s"] > 0
    assert rates["scoring_bf16"]["pairs_per_s"] is None  # predict_logits autocasts to bf16 on CUDA only
    assert 8 < rates["mean_tokens_per_pair"] <= 64
    forward = rates["flops_per_pair"]["forward"]
    assert forward == pytest.approx(2 * rates["non_embedding_parameters"] * rates["mean_tokens_per_pair"])
    assert rates["flops_per_pair"]["train"] == pytest.approx(3 * forward)
    # each utilisation is its rate times its FLOPs over the same device's matrix-multiply ceiling, and below it:
    # a rate off by a unit (pairs per ms, a batch counted as a pair) lands above the ceiling or far from it
    for name, flops in (("scoring_fp32", forward), ("training", rates["flops_per_pair"]["train"])):
        achieved = rates[name]["pairs_per_s"] * flops / 1e12
        assert rates[name]["tflops"] == pytest.approx(achieved)
        assert rates[name]["mfu_vs_gemm"] == pytest.approx(achieved / rates["gemm_tflops"]["fp32"])
        assert 0 < rates[name]["mfu_vs_gemm"] < 1, name
    assert rates["peak_tflops"] is None and rates["scoring_fp32"]["mfu_vs_peak"] is None  # no peak for a CPU


def test_gpu_script_is_valid_bash():
    script = REPO / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "torch==2.13.0" in text and "benchmarks/gpu_rates.py" in text and "docs/benchmarks/gpu.json" in text


def test_sizing_reproduces_the_measured_projection_and_prints_a_row_per_scenario():
    from benchmarks import sizing

    # benchmarks/scoring.py projected 100,000 users x 5,000 ads at K = 100 from the same rates, without the
    # semantic match's embeddings (benchmarks/match_rates.py) and its items' stage-1 scores
    projected = sizing.SCORING["projected_hours"]["two_stage_default_k"]
    items = sizing.MATCH_ITEMS_PER_USER
    match_hours = (105_000 + 100_000 * items) / sizing.CPU.match_embed / 3600
    match_hours += 100_000 * 5_000 * items / sizing.CPU.stage1 / 3600
    assert sizing.rerank_hours(100_000, 5_000, sizing.CPU) - match_hours == pytest.approx(projected, rel=0.01)
    assert sizing.GPU.score > sizing.CPU.score and sizing.GPU.score < sizing.GPU.tokenize
    assert len(sizing.table().splitlines()) == 2 + len(sizing.SCENARIOS)
