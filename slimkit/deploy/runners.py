"""Models ready to time: ONNX files in ONNX Runtime (CPU, CUDA, TensorRT) and networks in torch eager."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from slimkit.core.errors import SlimkitError, one_line
from slimkit.core.globalstate import usable_cpus

# user-facing provider name -> ONNX Runtime execution providers, in preference order
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "torch": [],
}


def warn(msg: str) -> None:
    logging.getLogger("slimkit").warning(f"slimkit: warning: {msg}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclasses.dataclass
class Runner:
    """One model ready to run: ``run(batch)`` executes one timed forward on a prepared input."""

    name: str
    engine: str  # "onnxruntime" | "torch"
    provider: str  # the provider/device that actually runs it
    device: str
    precision: str
    input_shape: tuple[int, ...]
    prepare: Callable[[int], None]  # allocate the input for a batch size (outside the timing)
    run: Callable[[], None]
    # the allocator whose peak counter gives this model's memory (None where the engine has none)
    memory: MemoryCounter | None = None


class MemoryCounter:
    """A peak-memory counter: ``reset()`` before one run of a model, ``read()`` after it (bytes)."""

    def reset(self) -> None:
        raise NotImplementedError

    def read(self) -> int:
        raise NotImplementedError


class _CudaPeak(MemoryCounter):
    """torch's CUDA allocator: the model's weights and input, plus the most its forward allocates on top."""

    def __init__(self, resident: Callable[[], int]):
        self.resident, self.before = resident, 0

    def reset(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated()  # every model's weights and inputs: not this run's

    def read(self) -> int:
        torch.cuda.synchronize()
        return self.resident() + torch.cuda.max_memory_allocated() - self.before


def peak_memory(runner: Runner) -> int | None:
    """``runner``'s own peak memory at its prepared batch: one run of it alone between reset and read."""
    if runner.memory is None:
        return None
    runner.memory.reset()
    runner.run()
    return runner.memory.read()


def provider_options(provider: str, batches: Sequence[int], precision: str, input_name: str,
                     input_shape: Sequence[int], cache_dir: str | Path | None = None,
                     device_id: int = 0) -> list[dict[str, Any]]:
    """ONNX Runtime options for each provider of ``PROVIDERS[provider]``, in that order.

    TensorRT: fp16 kernels for an fp16 file (else TensorRT builds fp32 engines whatever the file
    holds), an engine and timing cache in ``cache_dir`` (engines take minutes to build), and one
    optimisation profile covering the batches timed: min = the smallest, opt = max = the largest.
    CUDA: the GPU and an exhaustive cuDNN convolution search (like torch's cudnn.benchmark).
    """
    dims = "x".join(str(d) for d in input_shape)
    out: list[dict[str, Any]] = []
    for name in PROVIDERS[provider]:
        if name == "TensorrtExecutionProvider":
            opts: dict[str, Any] = {
                "device_id": device_id, "trt_fp16_enable": precision == "fp16",
                "trt_profile_min_shapes": f"{input_name}:{min(batches)}x{dims}",
                "trt_profile_opt_shapes": f"{input_name}:{max(batches)}x{dims}",
                "trt_profile_max_shapes": f"{input_name}:{max(batches)}x{dims}",
            }
            if cache_dir is not None:
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                            trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
            out.append(opts)
        elif name == "CUDAExecutionProvider":
            out.append({"device_id": device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"})
        else:
            out.append({})
    return out


def _preload_tensorrt() -> None:
    """Load TensorRT's libraries from the ``tensorrt-cu13-libs`` wheel (slimkit[tensorrt]), which installs
    them inside its package where ORT's provider library cannot find them. Untested: no GPU here."""
    import ctypes

    try:
        import tensorrt_libs
    except ImportError:
        return  # ORT's load error says what is missing
    where = Path(tensorrt_libs.__file__).parent
    for lib in sorted(where.glob("libnvinfer.so.*")) + sorted(where.glob("libnvonnxparser.so.*")):
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _session(path: Path, opts, providers: list[str], options: list[dict[str, Any]]):
    """An ORT session and, when a provider could not start, ORT's reason (its fallback prints it to stdout)."""
    import contextlib
    import io

    import onnxruntime as ort

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # keep ORT's fallback banner out of our table
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers, provider_options=options)
    reason = next((line.split(" when using ")[0].removeprefix("EP Error").strip()
                   for line in printed.getvalue().splitlines() if line.startswith("EP Error ")), "")
    return sess, re.sub(r"^\S+\.cc:\d+ [^)]*\)\s*", "", reason)  # drop ORT's source location


def onnx_runner(path: Path, provider: str, threads: int | None, input_shape: tuple[int, ...] | None,
                batches: Sequence[int] = (1,), cache_dir: str | Path | None = None) -> Runner:
    """Runner for an ONNX file in ONNX Runtime with the named provider (cpu, cuda, tensorrt).

    ``batches`` are the batch sizes that will be timed (TensorRT's optimisation profile);
    ``cache_dir`` keeps TensorRT engines between runs (default: ~/.cache/slimkit/tensorrt).
    """
    import onnx
    import onnxruntime as ort

    if provider == "torch":
        raise SlimkitError(f"{path} is an ONNX file; --provider torch runs checkpoints (give a .pt file) "
                           "or choose cpu, cuda or tensorrt")
    wanted = PROVIDERS[provider]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise SlimkitError(f"{path} is not a loadable ONNX model: {one_line(exc, 160)}") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("slimkit.precision") == "int8":  # slimkit's INT8 files are made and checked for ORT's CPU provider
        from slimkit.deploy.quantize import check_int8_provider

        try:
            check_int8_provider(provider)
        except SlimkitError as exc:
            raise SlimkitError(f"{path.name}: {exc}") from exc
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise SlimkitError(f"provider {provider} ({wanted[0]}) is not available in this onnxruntime; available: "
                           f"{', '.join(available)}")
    inp = proto.graph.input[0]
    elem = inp.type.tensor_type.elem_type
    dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32
    if input_shape is None:
        if "slimkit.input_shape" in props:
            input_shape = tuple(json.loads(props["slimkit.input_shape"]))
        else:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
            if not dims or any(d <= 0 for d in dims):
                raise SlimkitError(f"{path} has no fixed input shape; pass --input-shape C,H,W")
            input_shape = tuple(dims)
    # errors only: a GPU provider that cannot load says why (e.g. "libnvinfer.so.10: cannot open shared object file")
    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or usable_cpus()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    precision = props.get("slimkit.precision", "fp16" if dtype == np.float16 else "fp32")
    if cache_dir is None and provider == "tensorrt":
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimkit" / "tensorrt"
        cache_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.current_device() if provider != "cpu" and torch.cuda.is_available() else 0
    options = provider_options(provider, batches, precision, inp.name, input_shape, cache_dir, gpu)
    if provider == "tensorrt":
        _preload_tensorrt()
    try:
        sess, reason = _session(path, opts, wanted, options)
    except Exception as exc:
        raise SlimkitError(f"ONNX Runtime cannot load {path} with {wanted[0]}: {one_line(exc, 160)}") from exc
    actual = sess.get_providers()[0]
    if actual != wanted[0]:  # ORT falls back when a GPU provider cannot start; we say so, and why
        hint = " (TensorRT's libraries: pip install 'slimkit[tensorrt]')" if provider == "tensorrt" else ""
        warn(f"{path.name}: {wanted[0]} could not start here: {reason or 'see ONNX Runtime error above'}{hint}; "
             f"running on {actual} instead (see the provider column)")
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    on_gpu = actual in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    state: dict[str, Any] = {}

    def prepare(batch: int) -> None:
        x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(dtype)
        if on_gpu:  # IOBinding: input and output stay on the GPU, copies stay out of the timing
            io = sess.io_binding()
            state["x"] = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            io.bind_ortvalue_input(in_name, state["x"])
            io.bind_output(out_name, "cuda", 0)
            state["io"] = io
        else:
            state["feed"] = {in_name: x}

    def run() -> None:
        if on_gpu:
            sess.run_with_iobinding(state["io"])
            state["io"].synchronize_outputs()
        else:
            sess.run([out_name], state["feed"])

    device = _gpu_name() if on_gpu else cpu_name()
    return Runner(path.name, "onnxruntime", actual, device, precision, tuple(input_shape), prepare, run)


def _gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"


def torch_runner(model: torch.nn.Module, name: str, provider: str = "cpu", threads: int | None = None,
                 input_shape: tuple[int, ...] | None = None, fp16: bool = False,
                 channels_last: bool = False) -> Runner:
    """Runner for an in-memory network in torch eager mode (``provider`` cpu/torch or cuda)."""
    from slimkit.models import spec_of

    if provider == "tensorrt":
        raise SlimkitError(f"{name} is a checkpoint; TensorRT runs ONNX files (export it with `slimkit export`)")
    device = "cuda" if provider == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SlimkitError("provider cuda needs a CUDA GPU, and torch sees none here; use --provider cpu or torch")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # like ORT's exhaustive conv search: fixed shapes, fastest algorithms
    shape = tuple(input_shape or spec_of(model).input_shape)
    torch.set_num_threads(threads or usable_cpus())
    dtype = torch.float16 if fp16 else torch.float32
    model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    state: dict[str, Any] = {}

    def prepare(batch: int) -> None:
        gen = torch.Generator().manual_seed(0)
        state["x"] = torch.randn(batch, *shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt)

    @torch.inference_mode()
    def run() -> None:
        model(state["x"])
        if device == "cuda":
            torch.cuda.synchronize()

    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

    def resident() -> int:
        return weights + state["x"].numel() * state["x"].element_size()

    return Runner(name, "torch", f"torch-{device}", _gpu_name() if device == "cuda" else cpu_name(),
                  "fp16" if fp16 else "fp32", shape, prepare, run, _CudaPeak(resident) if device == "cuda" else None)


def make_runner(path: str | Path | torch.nn.Module, provider: str = "cpu", threads: int | None = None,
                input_shape: tuple[int, ...] | None = None, fp16: bool = False,
                channels_last: bool = False, source: dict[str, Any] | None = None,
                batches: Sequence[int] = (1,)) -> Runner:
    """ONNX files run in ONNX Runtime; anything else is read as a checkpoint and runs in torch.

    ``fp16`` and ``channels_last`` apply to checkpoints (torch); an ONNX file's precision is its own.
    ``source`` (arch, num_classes, model_args, ema, state_key) says what a plain state_dict or training
    checkpoint is (any file :func:`slimkit.read` reads: zip or legacy torch.save, safetensors). An
    ``nn.Module`` runs in torch as it is (its input shape from ``input_shape`` or its ModelSpec).
    """
    if provider not in PROVIDERS:
        raise SlimkitError(f"unknown provider {provider!r}; available: {', '.join(PROVIDERS)}")
    if isinstance(path, torch.nn.Module):
        from slimkit.models.checkpoint import from_module

        model = from_module(path, input_shape).model
        return check_trial(torch_runner(model, type(path).__name__, "cpu" if provider in ("torch", "cpu") else provider,
                                        threads or usable_cpus(), input_shape, fp16=fp16,
                                        channels_last=channels_last))
    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    threads = threads or usable_cpus()
    if path.suffix == ".onnx":
        runner = onnx_runner(path, provider, threads, input_shape, batches)
    else:
        from slimkit.models.checkpoint import load

        model = load(path, **(source or {}), plain_only=True)  # the flags describe plain state_dicts only
        runner = torch_runner(model, path.name, "cpu" if provider in ("torch", "cpu") else provider, threads,
                              input_shape, fp16=fp16, channels_last=channels_last)
    return check_trial(runner)


def check_trial(runner: Runner) -> Runner:
    """One untimed run: a shape that does not fit fails here, clearly, not mid-benchmark."""
    try:
        runner.prepare(1)
        runner.run()
    except Exception as exc:
        raise SlimkitError(f"{runner.engine} cannot run {runner.name} at input shape "
                           f"{list(runner.input_shape)}: {one_line(exc, 160)}") from exc
    return runner
