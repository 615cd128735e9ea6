"""The verbs that read a trained network: extract, export, bench, compare, and the model list."""
from __future__ import annotations

import argparse
import json
import logging

from slimkit.cli.options import (
    fail,
    finish_verb,
    int8_args,
    network_args,
    out_arg,
    positive_int,
    source_args,
    split_rate,
    timing_args,
    weights_args,
)

log = logging.getLogger("slimkit")


def emit(args: argparse.Namespace, report: dict, human: str) -> None:
    """The verb's report on stdout: JSON with --json, else the human text."""
    print(json.dumps(report, indent=2) if args.json else human)


def _cmd_extract(args: argparse.Namespace) -> int:
    from slimkit.methods.ke.extract import extract

    report = extract(
        args.ckpt, split_rate=args.split_rate, split_mode=args.split_mode, arch=args.arch,
        num_classes=args.num_classes, model_args=args.model_args, out=args.out, force=args.force,
        input_shape=args.input_shape, ema=args.ema, state_key=args.state_key,
    )
    emit(args, report.to_json(), report.table())
    return 0


def align_value(text: str) -> int | str:
    """argparse type of --align: a positive integer or 'auto'."""
    from slimkit.core.errors import SlimkitError
    from slimkit.deploy.align import check_align

    try:
        return check_align(text)
    except SlimkitError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--align ")) from exc


def _cmd_export(args: argparse.Namespace) -> int:
    from slimkit.deploy.exporting import export_onnx

    if args.out is None:
        return fail("export", "the following arguments are required: -o/--out")
    report = export_onnx(
        args.ckpt, args.out, input_shape=args.input_shape, opset=args.opset, fp16=args.fp16,
        fp16_io=args.fp16_io, arch=args.arch, num_classes=args.num_classes, model_args=args.model_args,
        force=args.force, int8=args.int8, calib=args.calib, calib_size=args.calib_size, data=args.data,
        max_drop=args.max_drop, align=args.align, provider=args.provider, ema=args.ema, state_key=args.state_key,
    )
    emit(args, report.to_json(), report.summary())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from slimkit.deploy.bench import bench_files

    source = {"arch": args.arch, "num_classes": args.num_classes, "model_args": args.model_args, "ema": args.ema,
              "state_key": args.state_key}
    report = bench_files(args.models, batch=args.batch, provider=args.provider, threads=args.threads,
                         input_shape=args.input_shape, torch_fp16=args.torch_fp16, channels_last=args.channels_last,
                         source=source, warmup=args.warmup, runs=args.runs, out=args.out, force=args.force)
    emit(args, report.to_json(), report.table())
    if args.out:
        log.info(f"wrote {args.out}/bench.md, bench.json and bench.png")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimkit.deploy.bench import parse_batches
    from slimkit.deploy.compare import compare, default_compare_dir

    rep = compare(
        args.ckpt, split_rate=args.split_rate, data=args.data, batches=parse_batches(args.batch),
        provider=args.provider, threads=args.threads, warmup=args.warmup, runs=args.runs, out=args.out,
        force=args.force, arch=args.arch, num_classes=args.num_classes, model_args=args.model_args,
        profile=args.profile, precision=args.precision, align=args.align, calib=args.calib,
        calib_size=args.calib_size, max_drop=args.max_drop, ema=args.ema, state_key=args.state_key,
        input_shape=args.input_shape,
    )
    emit(args, rep.to_json(), rep.markdown())
    out = args.out or default_compare_dir(Path(args.ckpt))
    log.info(f"wrote {out}/compare.md, compare.json, compare.png in {rep.seconds:.1f} s")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from slimkit.models import list_sources, zoo_outcomes

    outcomes = zoo_outcomes()
    rows = list_sources(args.filter)
    if not rows:
        return fail("models", f"no model source matches {args.filter!r}")
    described = [_describe(name, kind, outcomes) for name, kind in rows]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for d in described:
        print(f"{d['kind']:11}  {d['signature']}  {d['input']}  cut: {d['cut']}")
    print(f"\n{len(rows)} sources. Also: --arch package.module:callable (your own model class or function). "
          "A plain state_dict needs --arch, and --model-args for any argument other than num_classes that "
          "differs from these defaults; 'cut' is the zoo test's outcome (benchmarks/results/zoo.md).")
    return 0


def _describe(name: str, kind: str, outcomes: dict) -> dict:
    """One model source: kind, signature, default input and cut status; a source that cannot load says why."""
    from slimkit.core.errors import SlimkitError
    from slimkit.models import input_shape_of, model_signature

    try:
        sig, shape = model_signature(name), "x".join(map(str, input_shape_of(name)))
    except SlimkitError as exc:
        sig, shape = name, f"({exc})"
    return {"name": name, "kind": kind, "signature": sig, "input": shape, "cut": outcomes.get(name, "untested")}


def add_parsers(sub) -> None:
    e = sub.add_parser(
        "extract", help="cut the KELS fit hypothesis out of a checkpoint as a smaller dense network",
        description="Build the fit hypothesis of a trained network as a physically smaller dense network, "
        "verify it equals the dense network with its reset hypothesis zeroed, write it (CKPT.slim.pt by "
        "default) and print dense vs slim parameters, MACs and file size.",
    )
    source_args(e)
    e.add_argument("--split-rate", type=split_rate, help="fraction of channels in the fit hypothesis, in (0, 1); "
                   "optional for KE checkpoints whose masks define the split")
    e.add_argument("--split-mode", default="kels", choices=("kels", "wels"), help="only kels has a slim network")
    out_arg(e, "where to write the slim checkpoint (default: beside CKPT as CKPT.slim.pt)", old_output=True)
    finish_verb(e, _cmd_extract, force="overwrite an existing output")

    x = sub.add_parser(
        "export", help="export a checkpoint to ONNX, verified against PyTorch in ONNX Runtime",
        description="Export to a self-contained ONNX file with input 'input', output 'logits' and a dynamic "
        "batch axis. The file is run in ONNX Runtime on random input before it is written: an fp32 export "
        "that differs from PyTorch by more than 1e-4 relative is refused.",
    )
    source_args(x)
    out_arg(x, "the .onnx file to write (required)", old_output=True)
    x.add_argument("--opset", type=positive_int, default=17, help="ONNX opset")
    x.add_argument("--fp16", action="store_true", help="fp16 weights and compute; input/output stay float32")
    x.add_argument("--fp16-io", action="store_true", help="with --fp16: float16 input/output too")
    int8_args(x)
    x.add_argument("--data", help="with --int8: held-out images ('digits' or a directory's test/ split) on which "
                   "INT8 accuracy is compared with fp32 (ONNX Runtime CPU); refused beyond --max-drop")
    x.add_argument("--align", type=align_value, metavar="N|auto",
                   help="pad every cut layer with zero channels up to a multiple of N (never beyond its dense "
                   "width): the same function, widths that fit blocked conv kernels (8: AVX2, 16: AVX-512), no "
                   "retraining; 'auto' times 1, 8, 16, 32 on --provider and keeps the fastest; with --int8 the "
                   "aligned fp32 graph is quantized")
    x.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt", "torch"),
                   help="where --align auto times the candidates; the provider an --int8 file is for (cpu only)")
    finish_verb(x, _cmd_export, force="overwrite an existing output")

    b = sub.add_parser(
        "bench", help="latency/throughput of ONNX files (ONNX Runtime) and checkpoints (torch eager)",
        description="Time the given models at each batch size: warm-up, then timed runs interleaved across "
        "models in blocks of 5 (A.. B.. B.. A..), each block after a 50 ms pause and one untimed run so the "
        "previous model's threads are idle. Reports p50/p90/p99, mean ± std, images/s, provider, threads, device.",
    )
    b.add_argument("models", nargs="+", help=".onnx files and/or checkpoints")
    network_args(b)
    weights_args(b, "training checkpoints")
    timing_args(b)
    b.add_argument("--torch-fp16", action="store_true", help="run checkpoints in half precision (torch)")
    b.add_argument("--channels-last", action="store_true", help="run checkpoints in channels_last memory format (torch)")
    out_arg(b, "also write bench.md, bench.json and bench.png (latency vs batch) into this directory")
    finish_verb(b, _cmd_bench, force="overwrite existing files in --out")

    c = sub.add_parser(
        "compare", help="dense vs fit hypothesis: params, MACs, ONNX size, latency, accuracy",
        description="Cut the KELS fit hypothesis, export dense and slim to ONNX (verified), time both "
        "interleaved on one provider, and report speed-up against the MAC ratio; with --data, accuracy too. "
        "Writes compare.md, compare.json and compare.png.",
    )
    source_args(c)
    c.add_argument("--split-rate", type=split_rate, help="fraction of channels kept, in (0, 1)")
    c.add_argument("--data", help="'digits' or a dataset directory (ImageFolder test/ or val/, or KE lists/tst.csv)")
    timing_args(c)
    c.add_argument("--profile", action="store_true",
                   help="also show ONNX Runtime's CPU kernel time by node kind (convs blocked/plain, depthwise, "
                   "reorders, classifier) for both networks: why the slim one saves more or less than its MACs")
    c.add_argument("--precision", help="the deployment table: comma-separated precisions of every artefact, e.g. "
                   "fp32,fp16,int8 (int8 needs --calib); dense and slim at each, timed interleaved, the fastest "
                   "within --max-drop of dense fp32's accuracy picked")
    c.add_argument("--align", help="with the deployment table: also slim at widths padded to a multiple of N, or "
                   "'auto' (the fastest of 1, 8, 16, 32 on the provider)")
    int8_args(c, table=True)
    out_arg(c, "output directory (default: CKPT.compare beside the checkpoint)")
    finish_verb(c, _cmd_compare, force="overwrite existing report files")

    m = sub.add_parser("models", help="list the model sources slimkit can build, with arguments, input and cut status")
    m.add_argument("--filter", help="only names containing this text (e.g. efficientnet, timm/resnet)")
    finish_verb(m, _cmd_models)
