"""`slimkit bench`: statistics, interleaving, engines, and refusals (never timings as pass/fail)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from slimkit import create_model, save
from slimkit.deploy.bench import bench
from slimkit.deploy.exporting import export_onnx
from slimkit.deploy.runners import MemoryCounter, Runner, make_runner


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    ck = save(create_model("cifar_resnet", depth=8, width=8), d / "a.pt")
    export_onnx(ck, d / "a.onnx")
    (d / "junk.onnx").write_bytes(b"not a protobuf at all")
    (d / "junk.bin").write_bytes(b"\x01\x02")
    torch.save(create_model("cifar_resnet", depth=8, width=8).state_dict(), d / "sd.pt")
    return d


def test_interleaves_models_and_reports_consistent_statistics():
    calls = []

    def fake(name, delay):
        def run():
            calls.append(name)
            time.sleep(delay)
        return Runner(name, "fake", "none", "cpu", "fp32", (3, 8, 8), lambda b: None, run)

    res = bench([fake("A", 0.001), fake("B", 0.02)], batches=[4], warmup=2, runs=5, block=2, settle=0)
    assert calls[:4] == ["A", "A", "B", "B"]  # warm-up
    # blocks of 2 timed runs, each after one untimed run, in order A B, B A, A B
    assert calls[4:] == ["A"] * 3 + ["B"] * 3 + ["B"] * 3 + ["A"] * 3 + ["A"] * 2 + ["B"] * 2
    a, b = res
    assert b.p50_ms >= 20 and a.p50_ms >= 1 and a.p50_ms < b.p50_ms  # a sleep never returns early
    assert a.runs == 5 and a.batch == 4
    calls.clear()
    bench([fake("A", 0)], batches=[4], warmup=1, runs=3, block=2)
    assert calls == ["A"] * 4  # one model: no untimed runs between timed ones


def test_percentiles_match_numpy():
    import numpy as np

    from slimkit.deploy.bench import _pct

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        ms = sorted(rng.exponential(5.0, n).tolist())
        for q in (0.5, 0.9, 0.99):
            assert _pct(ms, q) == pytest.approx(float(np.percentile(ms, 100 * q)), rel=1e-12)


def test_onnx_and_checkpoint_side_by_side(cli, files, tmp_path):
    r = cli("bench", files / "a.onnx", files / "a.pt", "--batch", "1,2", "--runs", "3", "--warmup", "1",
            "--out", tmp_path / "b", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["results"]  # --json: stdout is one JSON report and nothing else
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["results"] == rows
    assert (tmp_path / "b" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| a.onnx | CPUExecutionProvider | 1 |" in (tmp_path / "b" / "bench.md").read_text()
    assert {(x["model"], x["engine"], x["batch"]) for x in rows} == {
        ("a.onnx", "onnxruntime", 1), ("a.pt", "torch", 1), ("a.onnx", "onnxruntime", 2), ("a.pt", "torch", 2)}
    assert all(x["p50_ms"] > 0 and x["threads"] >= 1 and x["input_shape"] == [3, 32, 32] for x in rows)
    r = cli("bench", files / "a.onnx", "--batch", "1", "--runs", "2", "--warmup", "1", "--out", tmp_path / "b")
    assert r.code == 2 and "exists" in r.err  # a second run does not overwrite the first's files
    r = cli("bench", files / "a.onnx", "--batch", "1", "--runs", "2", "--warmup", "1")
    assert r.code == 0 and "| a.onnx | CPUExecutionProvider | 1 |" in r.out  # without --json: the table


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["a.onnx", "--provider", "metal"], "unknown provider 'metal'"),
        (["a.onnx", "--provider", "torch"], "--provider torch runs checkpoints"),
        (["a.pt", "--provider", "tensorrt"], "TensorRT runs ONNX files"),
        (["junk.onnx"], "not a loadable ONNX model"),
        (["junk.bin"], "is not a PyTorch checkpoint (corrupt or truncated?)"),
        (["missing.onnx"], "no such file"),
        (["a.onnx", "--batch", "0"], "positive"),
        (["a.onnx", "--batch", "x"], "comma-separated"),
        (["a.onnx", "--input-shape", "1,32,32"], "onnxruntime cannot run a.onnx at input shape [1, 32, 32]"),
        (["a.pt", "--input-shape", "1,32,32"], "torch cannot run a.pt"),
        (["sd.pt"], "plain state_dict, which does not say its architecture; pass --arch"),
        (["sd.pt", "--arch", "cifar_resnet"], "check --arch, --num-classes and --model-args"),
    ],
)
def test_bench_refusals(cli, files, argv, expected):
    argv = [str(files / argv[0]), *argv[1:]]
    r = cli("bench", *argv, "--runs", "1", "--warmup", "1")
    assert r.code == 2, r.out
    assert len(r.err.strip().splitlines()) == 1 and expected in r.err, r.err


def test_plain_state_dict_with_arch_and_model_args(cli, files):
    """The flags describe the plain state_dict; a self-describing checkpoint beside it ignores them."""
    demo = Path(__file__).resolve().parents[1] / "models" / "digits_resnet20.pt"  # depth 20, width 16
    r = cli("bench", files / "sd.pt", demo, "--arch", "cifar_resnet", "--model-args", "depth=8,width=8",
            "--batch", "1", "--runs", "2", "--warmup", "1")
    assert r.code == 0, r.err
    assert "| sd.pt | torch-cpu | 1 |" in r.out and "| digits_resnet20.pt | torch-cpu | 1 |" in r.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_checkpoint_without_gpu_is_refused(cli, files):
    r = cli("bench", files / "a.pt", "--provider", "cuda")
    assert r.code == 2 and "needs a CUDA GPU" in r.err


@pytest.mark.skipif(
    torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs an onnxruntime that lists CUDA on a machine without a GPU",
)
def test_gpu_provider_that_cannot_start_falls_back_visibly(cli, files):
    r = cli("bench", files / "a.onnx", "--provider", "cuda", "--runs", "1", "--warmup", "1")
    assert r.code == 0
    assert "warning" in r.err and "CPUExecutionProvider" in r.err
    assert "| a.onnx | CPUExecutionProvider |" in r.out  # the table says what really ran


def test_unavailable_provider_is_refused(cli, files, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    r = cli("bench", files / "a.onnx", "--provider", "tensorrt")
    assert r.code == 2 and "is not available" in r.err


def test_torch_runner_half_and_channels_last(files):
    r = make_runner(files / "a.pt", "torch", threads=1, fp16=True, channels_last=True)
    assert r.engine == "torch" and r.precision == "fp16" and r.provider == "torch-cpu"
    res = bench([r], [2], warmup=1, runs=2)
    assert res[0].p50_ms > 0 and res[0].precision == "fp16"


def test_bench_refuses_the_old_json_file_argument_before_timing(cli, files, tmp_path):
    # `--json FILE` (before --json meant stdout everywhere) would read FILE as a model: say what changed
    r = cli("bench", files / "a.onnx", "--json", tmp_path / "b.json", "--runs", "1", "--warmup", "1")
    assert r.code == 2 and "--json now prints the report on stdout" in r.err and len(r.err.splitlines()) == 1 and not (tmp_path / "b.json").exists()
    (tmp_path / "f").write_text("x")
    r = cli("bench", files / "a.onnx", "--out", tmp_path / "f", "--runs", "1", "--warmup", "1")
    assert r.code == 2 and "not a directory" in r.err
class _Allocator(MemoryCounter):
    """A stand-in for a GPU allocator: runs allocate and free; the counter keeps the peak since reset."""

    def __init__(self):
        self.current = self.peak = 0

    def reset(self) -> None:
        self.peak = self.current

    def read(self) -> int:
        return self.peak

    def forward(self, transient: int) -> None:
        self.peak = max(self.peak, self.current + transient)


def test_peak_memory_is_each_models_own_not_the_process_peak():
    # two models timed interleaved in one process: a small one (forward needs 100 bytes) and a big
    # one (10_000); each reports its own peak, though the big one ran between the small one's runs
    alloc = _Allocator()

    def model(name, transient):
        return Runner(name, "fake", "none", "gpu", "fp32", (3, 8, 8), lambda b: None,
                      lambda: alloc.forward(transient), memory=alloc)

    res = bench([model("small", 100), model("big", 10_000)], batches=[1, 4], warmup=1, runs=4, block=2, settle=0)
    assert {(r.model, r.batch): r.peak_memory_bytes for r in res} == {
        ("small", 1): 100, ("big", 1): 10_000, ("small", 4): 100, ("big", 4): 10_000}


def test_provider_options_follow_the_batches_and_the_precision(tmp_path):
    from slimkit.deploy.runners import provider_options

    trt, cuda, cpu = provider_options("tensorrt", [32, 1, 128], "fp16", "input", (3, 224, 224), tmp_path, device_id=1)
    assert trt["trt_fp16_enable"] is True and trt["device_id"] == 1
    assert trt["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert trt["trt_profile_opt_shapes"] == trt["trt_profile_max_shapes"] == "input:128x3x224x224"
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path)
    assert cuda == {"device_id": 1, "cudnn_conv_algo_search": "EXHAUSTIVE"} and cpu == {}
    assert provider_options("tensorrt", [8], "fp32", "x", (1, 8, 8))[0]["trt_fp16_enable"] is False
    assert provider_options("cpu", [1, 8], "fp32", "input", (3, 8, 8)) == [{}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine where TensorRT cannot start")
def test_tensorrt_that_cannot_start_says_why_and_keeps_the_table_clean(files):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "slimkit", "bench", str(files / "a.onnx"), "--provider", "tensorrt",
                        "--runs", "1", "--warmup", "1"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root), "XDG_CACHE_HOME": str(files / "cache")})
    assert r.returncode == 0, r.stderr
    warning = next(line for line in r.stderr.splitlines() if line.startswith("slimkit: warning:"))
    assert "TensorrtExecutionProvider could not start here: " in warning and "slimkit[tensorrt]" in warning
    assert "TensorRT libraries" in warning  # ORT's reason, not only the fact
    assert "libnvinfer" in r.stderr  # ORT's own load error is shown, not silenced
    assert "EP Error" not in r.stdout and "| a.onnx | CPUExecutionProvider | 1 |" in r.stdout


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_default_threads_are_the_cpus_this_process_may_use(cli, files):
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs to tell the affinity mask from the machine's core count")
    try:  # as in a container or under `taskset -c 0`: one CPU of the machine's several
        os.sched_setaffinity(0, {min(allowed)})
        r = cli("bench", files / "a.onnx", "--batch", "1", "--runs", "2", "--warmup", "1", "--json")
    finally:
        os.sched_setaffinity(0, allowed)
    assert r.code == 0, r.err
    assert {x["threads"] for x in json.loads(r.out)["results"]} == {1}
