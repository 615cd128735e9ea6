"""`slimkit export`: read a network, align it (align.py), export and verify it (export.py), quantize it
(quantize.py), write the file atomically.

onnx and onnxruntime are imported inside the functions that use them: `import slimkit` stays light.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.fileio import atomic_write, check_output
from slimkit.core.globalstate import keep_global_state
from slimkit.deploy.export import DEFAULT_OPSET, check_opset, onnx_metadata, parse_input_shape, to_verified_onnx
from slimkit.models import spec_of
from slimkit.models.checkpoint import source

__all__ = ["ExportReport", "export_onnx"]


@dataclasses.dataclass
class ExportReport:
    source: str
    output: str
    arch: str
    input_shape: list[int]  # (C, H, W); the batch axis is dynamic
    opset: int
    precision: str  # "fp32" | "fp16" | "int8" (weights and compute; IO precision in io_dtype)
    io_dtype: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float  # enforced bound on max_rel_diff: FP32_RTOL or FP16_RTOL
    verify_batch: int
    bytes: int
    seconds: float
    verified_on: str = "CPUExecutionProvider"  # the ONNX Runtime provider that ran the check
    int8: dict[str, Any] | None = None  # --int8: settings, calibration, accuracy check (slimkit.deploy.quantize)
    align: dict[str, Any] | None = None  # --align: the multiple, widths before/after, auto's timings (deploy/align.py)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        int8 = []
        if self.int8 is not None:
            from slimkit.deploy.quantize import Int8Result

            int8 = Int8Result(b"", **{k: v for k, v in self.int8.items() if k != "check"}, **self.int8["check"]).lines()
        return "\n".join([
            f"{self.arch} -> {self.output} ({self.bytes / 2**20:.2f} MB, opset {self.opset}, {self.precision}, "
            f"{self.io_dtype} input/output 'input' (batch,{shape}) -> 'logits', dynamic batch)",
            f"verified in ONNX Runtime ({self.verified_on.replace('ExecutionProvider', '')}): max |onnx - torch fp32| = "
            f"{self.max_abs_diff:.2e} (relative {self.max_rel_diff:.1e} <= {self.tolerance:g}) at batch {self.verify_batch}"
            + (" (the fp32 graph that was quantized)" if int8 else ""),
            *([] if self.align is None else [self.align["summary"]]),
            *int8,
            f"wrote {self.output} in {self.seconds:.1f} s",
        ])



@keep_global_state()  # rebuilding a network draws its throw-away init from the global generator
def export_onnx(
    ckpt: str | Path | nn.Module,
    out: str | Path,
    input_shape: str | Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    fp16_io: bool = False,
    arch: str | None = None,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
    force: bool = False,
    seed: int = 0,
    verify_batch: int = 2,
    int8: bool = False,
    calib: str | None = None,
    calib_size: int | None = None,
    data: str | None = None,
    max_drop: float = 1.0,
    align: int | str | None = None,
    provider: str = "cpu",
    ema: bool = False,
    state_key: str | None = None,
) -> ExportReport:
    """Export the network in ``ckpt`` (a checkpoint file or an ``nn.Module``) to ONNX, verify it in ONNX
    Runtime, then write it atomically. A module slimkit did not create needs ``input_shape``. ``ema`` /
    ``state_key`` pick the weights in a training checkpoint (see :func:`slimkit.read`).

    ``align`` (a multiple N, or ``"auto"``) pads every cut layer with zero channels up to a multiple of
    N (deploy/align.py); ``"auto"`` times the candidates 1, 8, 16, 32 on ``provider`` and keeps the
    fastest. The padded file is verified against the unpadded network.

    ``int8``: quantize the verified fp32 graph (the aligned one with ``align``) with ONNX Runtime's
    static QDQ quantization, calibrated on ``calib_size`` images of ``calib``, for ``provider`` (cpu
    only), and check it by accuracy on ``data`` (refused beyond ``max_drop`` points) or, without
    data, by agreement with fp32 (:mod:`slimkit.deploy.quantize`).
    """
    from slimkit.deploy.align import check_align

    t0 = time.perf_counter()
    fp16 = fp16 or fp16_io
    check_opset(opset)
    if align is not None:
        align = check_align(align)  # refused before anything is read
        from slimkit.deploy.runners import PROVIDERS

        if provider not in PROVIDERS:
            raise SlimkitError(f"unknown provider {provider!r}; available: {', '.join(PROVIDERS)}")
    if int8 and fp16:
        raise SlimkitError("--int8 and --fp16 exclude each other: INT8 quantizes the fp32 graph")
    if not int8 and (calib is not None or data is not None or calib_size is not None):
        raise SlimkitError("--calib, --calib-size and --data go with --int8 (an fp32/fp16 export is verified "
                           "against PyTorch, not by accuracy)")
    is_object = isinstance(ckpt, nn.Module)
    out = check_output(out, force, inputs=() if is_object else (ckpt,))
    given = parse_input_shape(input_shape) if input_shape is not None else None
    if is_object:
        src = source(ckpt, input_shape=given)
    else:
        src = source(ckpt, arch=arch, num_classes=num_classes, model_args=model_args, ema=ema, state_key=state_key,
                     input_shape=given)  # a plain state_dict's network is built for it, as in extract
    model, spec = src.model, spec_of(src.model)
    shape = given or tuple(spec.input_shape)
    meta = onnx_metadata(model, shape, src.meta.get("split"), src.sha256, fp16)
    preprocess = (src.meta.get("data") or {}).get("preprocess")
    if preprocess is not None:  # what the input must look like: resize policy and (x/255 - mean)/std
        meta["slimkit.preprocess"] = json.dumps(preprocess)
    request = None
    if int8:  # calibration and held-out images loaded and checked before the export
        from slimkit.deploy.quantize import DEFAULT_CALIB_SIZE, int8_request

        request = int8_request(calib, shape, src.meta, spec.args.get("num_classes"), calib_size or DEFAULT_CALIB_SIZE,
                               seed, data, max_drop, provider, opset)
    reference, aligned = None, None
    if align is not None:
        from slimkit.deploy.align import align_for_export

        reference, (model, aligned) = model, align_for_export(model, align, shape, provider, opset)
        meta.update(aligned.pop("metadata"))  # slimkit.plans stays the source's: the file describes that network
    v = to_verified_onnx(model, shape, opset, fp16, fp16_io, meta, seed, verify_batch, reference=reference)
    payload, q = v.data, None
    if request is not None:  # the verified fp32 graph (aligned, with --align) is what gets quantized
        from slimkit.deploy.quantize import to_int8

        q = to_int8(v.data, request, meta)
        payload = q.data
    atomic_write(out, lambda tmp: tmp.write_bytes(payload), force=force)
    return ExportReport(
        source=f"<{type(ckpt).__name__} object>" if is_object else str(ckpt), output=str(out), arch=spec.arch, input_shape=list(shape), opset=int(opset),
        precision="int8" if int8 else "fp16" if fp16 else "fp32", io_dtype="float16" if fp16_io else "float32",
        max_abs_diff=v.max_abs_diff, max_rel_diff=v.max_rel_diff, tolerance=v.tolerance, verify_batch=verify_batch,
        bytes=len(payload), seconds=time.perf_counter() - t0, verified_on=v.verified_on, align=aligned,
        int8=None if q is None else {"settings": q.settings, "calibration": q.calibration, "check": q.check()},
    )
