"""ONNX export verified against PyTorch in ONNX Runtime before it lands: :func:`to_verified_onnx` (in memory)
and the file's metadata. The `export` verb that reads, aligns, quantizes and writes is exporting.py; align.py,
bench.py, compare.py and table.py build on this module, which imports none of them.

onnx and onnxruntime are imported inside the functions that use them: `import slimkit` stays light.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from slimkit.core.errors import SlimkitError, one_line
from slimkit.core.surgery import plans_of
from slimkit.models import spec_of

__all__ = ["VerifiedOnnx", "to_verified_onnx", "onnx_metadata", "parse_input_shape", "check_opset",
           "verification_providers", "reference_output", "DEFAULT_OPSET", "FP32_RTOL", "FP16_RTOL"]

DEFAULT_OPSET = 17
FP32_RTOL = 1e-4  # ONNX vs torch, relative to max |logit|: above it the export is refused
# fp16 (10-bit mantissa, eps 9.8e-4): ~10 ulps of the largest logit. Measured on random-BN registry
# nets, CPU provider: 4e-4 (cifar_resnet) to 1.1e-3 (resnet50); an overflow (inf/NaN) is refused on its own
FP16_RTOL = 1e-2


def check_opset(opset: int) -> None:
    if not 7 <= int(opset) <= 23:
        raise SlimkitError(f"opset must be between 7 and 23, got {opset}")


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """'3,224,224' or (3, 224, 224) -> (3, 224, 224): C,H,W, the batch axis is always dynamic. The old
    N,C,H,W form still works for one release, with a FutureWarning (N is ignored)."""
    try:
        dims = [int(t) for t in (text.replace("x", ",").split(",") if isinstance(text, str) else text)]
    except ValueError as exc:
        raise SlimkitError(f"input shape must be C,H,W integers like 3,224,224, got {text!r}") from exc
    if len(dims) not in (3, 4) or any(d < 1 for d in dims):
        raise SlimkitError(f"input shape must be three positive integers C,H,W, got {text!r}")
    if len(dims) == 4:
        import warnings

        warnings.warn(f"input shape N,C,H,W ({text!r}) is deprecated; give C,H,W (the batch axis is always dynamic)",
                      FutureWarning, stacklevel=3)
    return tuple(dims[-3:])


class _Fp16Core(nn.Module):
    """fp16 weights and compute behind fp32 input/output, so callers keep feeding float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def verification_providers(fp16: bool, available: Sequence[str], cuda: bool) -> list[str]:
    """ONNX Runtime providers that verify an export, best first.

    fp16 files are checked on ORT's CUDA provider when a GPU is usable: the CPU provider may compute
    fp16 nodes in fp32 and hide the GPU's overflow and accumulation errors. fp32 files are checked
    on the CPU, the reference arithmetic (CUDA's TF32 convolutions would not meet FP32_RTOL).
    """
    if fp16 and cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ort_session(data: bytes, fp16: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings would break the one-line contract
    providers = verification_providers(fp16, ort.get_available_providers(), torch.cuda.is_available())
    return ort.InferenceSession(data, sess_options=opts, providers=providers)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def reference_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in fp32 on the model's own device (a library caller's model may live on a GPU), on the CPU."""
    with torch.inference_mode():
        return model(x.to(_device_of(model))).float().cpu()


def _to_onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice is not the user's problem
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


@dataclasses.dataclass
class VerifiedOnnx:
    data: bytes
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    verified_on: str = "CPUExecutionProvider"


def to_verified_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    fp16_io: bool = False,
    meta: dict[str, str] | None = None,
    seed: int = 0,
    verify_batch: int = 2,
    reference: nn.Module | None = None,
) -> VerifiedOnnx:
    """Serialise ``model`` to ONNX in memory and check it in ONNX Runtime against PyTorch fp32.

    fp32 exports must match to FP32_RTOL (relative to max |logit|), fp16 exports (weights and
    compute in half; IO float32 unless ``fp16_io``) to FP16_RTOL, and any inf or NaN in the ONNX
    output is refused. The model is run and traced on its own device. ``reference`` is the network
    the file must equal when it is not ``model`` itself (an aligned export is checked against the
    unpadded slim network).
    """
    import onnx

    fp16 = fp16 or fp16_io
    check_opset(opset)
    model = model.eval()
    arch = getattr(getattr(model, "slimkit_spec", None), "arch", type(model).__name__)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(verify_batch, *input_shape, generator=gen)  # drawn on the CPU: the same input on every device
    device = _device_of(model)
    try:
        ref = reference_output(model if reference is None else reference.eval(), x)
    except Exception as exc:
        raise SlimkitError(f"input shape {list(input_shape)} does not fit {arch} (run on {device}): "
                           f"{one_line(exc, 160)}") from exc
    if not torch.isfinite(ref).all():
        raise SlimkitError(f"{arch} gives inf/NaN logits in PyTorch fp32 on a random input; nothing to verify against")
    if fp16_io:
        core, x_in = copy.deepcopy(model).half().eval(), x.half()
    elif fp16:
        core, x_in = _Fp16Core(copy.deepcopy(model)).eval(), x
    else:
        core, x_in = model, x
    if fp16:  # the file's own arithmetic: ORT's CPU provider may run fp16 nodes in fp32 and never overflow
        try:
            half = reference_output(core, x_in)
        except Exception as exc:
            raise SlimkitError(f"{arch} cannot run in fp16 on {device}: {one_line(exc, 160)}") from exc
        _refuse_non_finite(half, "PyTorch fp16", fp16)
    try:
        # traced at batch 1 on the model's device, verified at another batch
        data = _to_onnx_bytes(core, x_in[:1].to(device), int(opset))
    except Exception as exc:
        raise SlimkitError(f"ONNX export of {arch} failed at opset {opset} (traced on {device}): {one_line(exc, 200)}") from exc

    proto = onnx.load_from_string(data)
    for k, v in (meta or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "slimkit"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()

    sess = _ort_session(data, fp16)
    provider = sess.get_providers()[0]
    got = torch.from_numpy(sess.run(["logits"], {"input": x_in.numpy()})[0]).float()
    if got.shape != ref.shape:
        raise SlimkitError(f"ONNX output shape {list(got.shape)} differs from PyTorch {list(ref.shape)}; nothing written")
    _refuse_non_finite(got, f"ONNX Runtime ({provider})", fp16)
    max_abs = float((got - ref).abs().max())
    max_rel = max_abs / max(float(ref.abs().max()), 1e-12)
    tol = FP16_RTOL if fp16 else FP32_RTOL
    if not max_rel <= tol:
        raise SlimkitError(
            f"ONNX Runtime ({provider}) disagrees with PyTorch: max |onnx - torch| = {max_abs:.3e} "
            f"(relative {max_rel:.1e} > {tol:g}); nothing written"
        )
    return VerifiedOnnx(data, max_abs, max_rel, tol, provider)


def _refuse_non_finite(out: torch.Tensor, where: str, fp16: bool) -> None:
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        why = " (fp16 overflows above 65504; export in fp32)" if fp16 else ""
        raise SlimkitError(f"{where} gives {bad} inf/NaN of {out.numel()} logits where PyTorch fp32 is finite{why}; "
                           "nothing written")


def onnx_metadata(model: nn.Module, input_shape: Sequence[int], split: Any, source_sha256: str, fp16: bool) -> dict[str, str]:
    """Metadata props recorded in every exported file."""
    from slimkit import __version__

    spec = spec_of(model)
    return {
        "slimkit.arch": spec.arch,
        "slimkit.model_args": json.dumps(spec.args),
        "slimkit.input_shape": json.dumps(list(input_shape)),
        "slimkit.split": json.dumps(split),
        "slimkit.plans": json.dumps([{"origin": p.origin, "widths": p.widths()} for p in plans_of(model)]),
        "slimkit.source_sha256": source_sha256,
        "slimkit.precision": "fp16" if fp16 else "fp32",
        "slimkit.version": __version__,
    }
