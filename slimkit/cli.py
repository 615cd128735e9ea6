"""`slimkit <verb>`: one thin function a verb; the work happens in the library.

User mistakes (SlimkitError, bad arguments) print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["main"]


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the text already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --gen for --generations would hide from --resume's flag check
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse prints usage + message over two lines; we print one
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _split_rate(text: str) -> float:
    from slimkit.errors import SlimkitError
    from slimkit.plan import check_split_rate

    try:
        return check_split_rate(text)
    except SlimkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_at_least(low: int, allowed: str):
    """argparse type for an integer >= ``low``; ``allowed`` says so in the refusal."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return n

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_workers = _int_at_least(0, "0 (load in the training process) or more")


def _augment_arg(p: argparse.ArgumentParser) -> None:
    from slimkit.data import AUGMENT_HELP, AUGMENTS

    p.add_argument("--augment", default="auto", choices=("auto", *AUGMENTS), metavar="PRESET", help=AUGMENT_HELP)


def _model_args(text: str) -> dict:
    """``depth=56,width=32`` (or a JSON object) -> constructor arguments; values parse as JSON scalars."""
    text = text.strip()
    if text.startswith("{"):
        try:
            out = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object: {exc}") from None
        if not isinstance(out, dict):
            raise argparse.ArgumentTypeError("must be a JSON object or key=value pairs")
        return out
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):  # split at top-level commas: widths=[16,32] stays one item
        depth += (ch in "[({") - (ch in "])}")
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    out = {}
    for item in filter(None, items):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected key=value pairs like depth=56,width=32, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value.strip()  # a bare word is a string
    return out


def _cmd_extract(args: argparse.Namespace) -> int:
    from slimkit.extract import extract

    report = extract(
        args.ckpt, split_rate=args.split_rate, split_mode=args.split_mode, arch=args.arch,
        num_classes=args.num_classes, model_args=args.model_args, out=args.output, force=args.force,
        input_shape=args.input_shape,
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from slimkit.export import export_onnx

    report = export_onnx(
        args.ckpt, args.output, input_shape=args.input_shape, opset=args.opset, fp16=args.fp16,
        fp16_io=args.fp16_io, arch=args.arch, num_classes=args.num_classes, model_args=args.model_args,
        force=args.force,
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from slimkit.bench import bench, format_table, make_runner, parse_batches, plot
    from slimkit.export import parse_input_shape
    from slimkit.fileio import atomic_write, check_output

    batches = parse_batches(args.batch)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    for out in (args.json, args.plot):  # refuse before spending minutes timing
        if out:
            check_output(out, args.force, inputs=tuple(args.models))
    source = {"arch": args.arch, "num_classes": args.num_classes, "model_args": args.model_args}
    runners = [make_runner(m, args.provider, args.threads, shape, args.torch_fp16, args.channels_last, source, batches)
               for m in args.models]
    results = bench(runners, batches, warmup=args.warmup, runs=args.runs, threads=args.threads)
    print(format_table(results))
    if args.json:
        payload = json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(payload), force=args.force)
    if args.plot:
        plot(results, args.plot, title=f"p50 latency, {results[0].provider}", force=args.force)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from slimkit.bench import parse_batches
    from slimkit.compare import compare, default_compare_dir

    rep = compare(
        args.ckpt, split_rate=args.split_rate, data=args.data, batches=parse_batches(args.batch),
        provider=args.provider, threads=args.threads, warmup=args.warmup, runs=args.runs, out=args.out,
        force=args.force, arch=args.arch, num_classes=args.num_classes, model_args=args.model_args,
        profile=args.profile,
    )
    print(rep.markdown())
    out = args.out or default_compare_dir(__import__("pathlib").Path(args.ckpt))
    print(f"\nwrote {out}/compare.md, compare.json, compare.png in {rep.seconds:.1f} s")
    return 0


def _train_config(args: argparse.Namespace, epochs: int | None = None, lr: float | None = None,
                  warmup_epochs: int | None = None):
    from slimkit.training.loop import TrainConfig

    return TrainConfig(epochs=epochs or args.epochs, batch_size=args.batch_size, lr=lr or args.lr,
                       warmup_epochs=args.warmup_epochs if warmup_epochs is None else warmup_epochs,
                       weight_decay=args.weight_decay, loss=args.loss, seed=args.seed)


def _run_dir(verb: str, args: argparse.Namespace) -> str:
    out = args.resume or args.out
    if out is None:
        raise SystemExit(_fail(verb, "give --out DIR for a new run or --resume DIR to continue one"))
    return out


def _rank0() -> bool:
    return int(__import__("os").environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes and speaks


def _launch(verb: str, args: argparse.Namespace, run, wrote: str) -> int:
    """Start or resume a training run in --out/--resume and say what it wrote (rank 0 only)."""
    out = _run_dir(verb, args)
    run(out, resume=args.resume is not None, progress=sys.stderr.isatty(), device=args.device, workers=args.workers)
    if _rank0():
        print(f"wrote {out}/{wrote}")
    return 0


def _cmd_evolve(args: argparse.Namespace) -> int:
    from slimkit.training.evolve import EvolveConfig, evolve

    cfg = EvolveConfig(arch=args.arch, data=args.data, split_mode=args.split_mode, split_rate=args.split_rate,
                       generations=args.generations, image_size=args.image_size,
                       train_per_class=args.train_per_class, round_to=args.round_to, eval_every=args.eval_every,
                       num_classes=args.num_classes, augment=args.augment, train=_train_config(args))
    return _launch("evolve", args, lambda out, **kw: evolve(cfg, out, **kw),
                   "summary.md, generations.png, metrics.jsonl and gen*/last.pt")


def _cmd_train(args: argparse.Namespace) -> int:
    from slimkit.training.train import TrainRunConfig, train

    cfg = TrainRunConfig(arch=args.arch, data=args.data, image_size=args.image_size,
                         train_per_class=args.train_per_class, subset_seed=args.subset_seed,
                         eval_every=args.eval_every, num_classes=args.num_classes, augment=args.augment,
                         train=_train_config(args))
    return _launch("train", args, lambda out, **kw: train(cfg, out, **kw),
                   "last.pt, summary.md, curves.png and metrics.jsonl")


def _cmd_merge(args: argparse.Namespace) -> int:
    from slimkit.training.merge import MergeConfig, merge

    cfg = MergeConfig(data=args.data, train_per_class=args.train_per_class, subset_seed=args.subset_seed,
                      gate=_train_config(args, args.gate_epochs, args.lr, args.warmup_epochs),
                      finetune=_train_config(args, args.finetune_epochs, args.finetune_lr, args.finetune_warmup_epochs),
                      gate_lr=args.gate_lr, lambda_init=args.lambda_init, lambda_step=args.lambda_step,
                      eval_every=args.eval_every, augment=args.augment)
    return _launch("merge", args, lambda out, **kw: merge(cfg, args.teachers, out, arch=args.arch,
                                                           num_classes=args.num_classes, **kw),
                   "big.pt, compressed.pt, last.pt, summary.md, gates.png, curves.png and metrics.jsonl")


def _cmd_den(args: argparse.Namespace) -> int:
    from slimkit.training.den import DENConfig, run_den

    hidden, channels = (312, 128), ()
    kind, _, widths = args.arch.partition(":")
    if kind not in ("mlp", "conv") or (kind == "conv" and not widths):
        raise SystemExit(_fail("den", f"--arch must be mlp, mlp:W1,W2,... or conv:C1,C2,... (units are channels), "
                                      f"got {args.arch!r}"))
    if widths:
        try:
            parsed = tuple(int(w) for w in widths.split(","))
        except ValueError:
            raise SystemExit(_fail("den", f"--arch {kind}:... needs integer widths, got {args.arch!r}")) from None
        hidden, channels = (parsed, ()) if kind == "mlp" else ((), parsed)
    baselines = () if args.baselines == "none" else tuple(b for b in args.baselines.split(",") if b)
    cfg = DENConfig(data=args.data, tasks=args.tasks, hidden=hidden, channels=channels, image_size=args.image_size, epochs=args.epochs,
                    lr=args.lr, batch_size=args.batch_size, l1=args.l1, l1_head=args.l1_head, l2=args.l2, tau=args.tau, k=args.k,
                    train_per_class=args.train_per_class, expand_on=args.expand_on, val_fraction=args.val_fraction,
                    tau_val=args.tau_val,
                    group=args.group_lasso, drift_lambda=args.drift_lambda, sigma=args.sigma, baselines=baselines,
                    seed=args.seed)
    out = _run_dir("den", args)
    run_den(cfg, out, progress=sys.stderr.isatty(), resume=args.resume is not None, device=args.device)
    print(f"wrote {out}/summary.md, den.png, results.json, metrics.jsonl and task*.pt")
    return 0


def _real(positive: bool):
    """argparse type for a finite number, > 0 (``positive``) or >= 0."""
    import math

    word = "positive" if positive else "non-negative"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {word} number, got {text!r}") from None
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise argparse.ArgumentTypeError(f"must be a {word} number, got {text!r}")
        return v

    return parse


_positive_float, _nonneg_float = _real(True), _real(False)


def _fail(verb: str, msg: str) -> int:
    sys.stderr.write(f"slimkit {verb}: error: {msg}\n")
    return 2


def _cmd_models(args: argparse.Namespace) -> int:
    from slimkit.models import list_sources, zoo_outcomes

    outcomes = zoo_outcomes()
    rows = list_sources(args.filter)
    if not rows:
        return _fail("models", f"no model source matches {args.filter!r}")
    for name, kind in rows:
        print(_model_row(name, kind, outcomes))
    print(f"\n{len(rows)} sources. Also: --arch package.module:callable (your own model class or function). "
          "A plain state_dict needs --arch, and --model-args for any argument other than num_classes that "
          "differs from these defaults; 'cut' is the zoo test's outcome (benchmarks/results/zoo.md).")
    return 0


def _model_row(name: str, kind: str, outcomes: dict) -> str:
    """``kind  name(args)  CxHxW  cut: yes|refused (why)|untested``; a source that cannot load says why."""
    from slimkit.errors import SlimkitError
    from slimkit.models import input_shape_of, model_signature

    try:
        sig, shape = model_signature(name), "x".join(map(str, input_shape_of(name)))
    except SlimkitError as exc:
        sig, shape = name, f"({exc})"
    return f"{kind:11}  {sig}  {shape}  cut: {outcomes.get(name, 'untested')}"


def _input_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be C,H,W integers like 3,64,64, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be three positive integers C,H,W, got {text!r}")
    return shape


def _source_args(p: argparse.ArgumentParser) -> None:
    """CKPT and the flags that say what a plain state_dict is: shared by every verb reading a checkpoint."""
    p.add_argument("ckpt", help="slimkit checkpoint, plain state_dict (needs --arch) or official KE checkpoint")
    p.add_argument("--arch", help="model source of a plain state_dict: a built-in or torchvision name, timm/NAME, or "
                   "package.module:callable (see `slimkit models`); also allows a checkpoint built by that import path")
    p.add_argument("--num-classes", type=_positive_int, help="classes of a plain state_dict (inferred when omitted)")
    p.add_argument("--model-args", type=_model_args,
                   help="other constructor arguments of a plain state_dict's network, e.g. depth=56,width=32 "
                   "(see `slimkit models`)")


def _timing_args(p: argparse.ArgumentParser) -> None:
    """How to time: shared by bench and compare."""
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt (ONNX Runtime) | torch (eager, CPU)")
    p.add_argument("--threads", type=_positive_int, help="intra-op threads (default: all cores)")
    p.add_argument("--warmup", type=_positive_int, default=10, help="untimed runs per model and batch")
    p.add_argument("--runs", type=_positive_int, default=50, help="timed runs per model and batch")


def _optim_args(p: argparse.ArgumentParser) -> None:
    """Optimiser and loss flags shared by the training verbs."""
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per training step")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty on every parameter (SGD weight decay)")
    p.add_argument("--loss", default="ce", choices=("ce", "smooth", "cskd"),
                   help="cross-entropy, label smoothing 0.1, or CS-KD (class-wise self-distillation, T=4)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, masks, shuffling and augmentation: same seed, same CPU run")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="'digits' or a dataset directory (ImageFolder train/ test/, or KE lists/)")
    p.add_argument("--train-per-class", type=_positive_int, help="seeded per-class subset of the training split")
    p.add_argument("--eval-every", type=_positive_int, default=1, help="evaluate every N epochs (and at the end)")
    _augment_arg(p)


def _from_scratch_args(p: argparse.ArgumentParser, epochs_help: str) -> None:
    """Network, schedule, optimiser and data flags of the verbs that train a registry net from scratch."""
    p.add_argument("--arch", default="cifar_resnet", help="registry architecture (default cifar_resnet)")
    p.add_argument("--epochs", type=_positive_int, default=30, help=epochs_help)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine with warm-up)")
    p.add_argument("--warmup-epochs", type=int, default=5, help="linear learning-rate warm-up epochs before the cosine decay")
    _optim_args(p)
    _data_args(p)
    p.add_argument("--image-size", type=_positive_int,
                   help="square input side the data is resized to (default: 16 for the built-in small nets; a "
                   "torchvision, timm or own model's default input, e.g. 224)")
    p.add_argument("--num-classes", type=_positive_int,
                   help="the classes the data must have (default: whatever the data has)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when a GPU is visible) | cpu | cuda; CUDA trains "
                   "under bf16 autocast with channels_last")
    p.add_argument("--out", help="new run directory (must be empty or absent)")
    p.add_argument("--resume", help="continue the run in this directory (same settings)")
    p.add_argument("--workers", type=_workers, default=None,
                   help="loader processes for image directories (default: one per CPU less one, at most 8, and 0 "
                   "below 4 CPUs; 0 loads in the training process); results do not depend on it")


def build_parser() -> argparse.ArgumentParser:
    from slimkit import __version__

    p = _Parser(prog="slimkit", description="Make trained networks physically smaller and faster, and prove it.")
    p.add_argument("--version", action="version", version=f"slimkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error (also SLIMKIT_DEBUG=1)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    e = sub.add_parser(
        "extract", help="cut the KELS fit hypothesis out of a checkpoint as a smaller dense network",
        description="Build the fit hypothesis of a trained network as a physically smaller dense network, "
        "verify it equals the dense network with its reset hypothesis zeroed, write it (CKPT.slim.pt by "
        "default) and print dense vs slim parameters, MACs and file size.",
    )
    _source_args(e)
    e.add_argument("--split-rate", type=_split_rate, help="fraction of channels in the fit hypothesis, in (0, 1); "
                   "optional for KE checkpoints whose masks define the split")
    e.add_argument("--split-mode", default="kels", choices=("kels", "wels"), help="only kels has a slim network")
    e.add_argument("-o", "--output", help="where to write the slim checkpoint (default: beside CKPT as CKPT.slim.pt)")
    e.add_argument("--force", action="store_true", help="overwrite an existing output")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--input-shape", type=_input_shape,
                   help="C,H,W input of a plain state_dict's network (default: the model source's, e.g. a timm "
                   "model's config); a slimkit checkpoint records its own")
    e.set_defaults(func=_cmd_extract)

    x = sub.add_parser(
        "export", help="export a checkpoint to ONNX, verified against PyTorch in ONNX Runtime",
        description="Export to a self-contained ONNX file with input 'input', output 'logits' and a dynamic "
        "batch axis. The file is run in ONNX Runtime on random input before it is written: an fp32 export "
        "that differs from PyTorch by more than 1e-4 relative is refused.",
    )
    _source_args(x)
    x.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    x.add_argument("--input-shape", help="N,C,H,W or C,H,W (default: the checkpoint's); batch stays dynamic")
    x.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default 17)")
    x.add_argument("--fp16", action="store_true", help="fp16 weights and compute; input/output stay float32")
    x.add_argument("--fp16-io", action="store_true", help="with --fp16: float16 input/output too")
    x.add_argument("--force", action="store_true", help="overwrite an existing output")
    x.add_argument("--json", action="store_true", help="print the report as JSON")
    x.set_defaults(func=_cmd_export)

    b = sub.add_parser(
        "bench", help="latency/throughput of ONNX files (ONNX Runtime) and checkpoints (torch eager)",
        description="Time the given models at each batch size: warm-up, then timed runs interleaved across "
        "models in blocks of 5 (A.. B.. B.. A..), each block after a 50 ms pause and one untimed run so the "
        "previous model's threads are idle. Reports p50/p90/p99, mean ± std, images/s, provider, threads, device.",
    )
    b.add_argument("models", nargs="+", help=".onnx files and/or checkpoints")
    b.add_argument("--arch", help="architecture of plain state_dict checkpoints (see `slimkit models`)")
    b.add_argument("--num-classes", type=_positive_int, help="classes of plain state_dict checkpoints")
    b.add_argument("--model-args", type=_model_args, help="other constructor arguments of plain state_dicts")
    _timing_args(b)
    b.add_argument("--input-shape", help="C,H,W (default: from the file's metadata)")
    b.add_argument("--torch-fp16", action="store_true", help="run checkpoints in half precision (torch)")
    b.add_argument("--channels-last", action="store_true", help="run checkpoints in channels_last memory format (torch)")
    b.add_argument("--json", help="also write the results as JSON here")
    b.add_argument("--plot", help="also write a PNG plot of latency vs batch here")
    b.add_argument("--force", action="store_true", help="overwrite existing --json/--plot outputs")
    b.set_defaults(func=_cmd_bench)

    c = sub.add_parser(
        "compare", help="dense vs fit hypothesis: params, MACs, ONNX size, latency, accuracy",
        description="Cut the KELS fit hypothesis, export dense and slim to ONNX (verified), time both "
        "interleaved on one provider, and report speed-up against the MAC ratio; with --data, accuracy too. "
        "Writes compare.md, compare.json and compare.png.",
    )
    _source_args(c)
    c.add_argument("--split-rate", type=_split_rate, help="fraction of channels kept, in (0, 1)")
    c.add_argument("--data", help="'digits' or a dataset directory (ImageFolder test/ or val/, or KE lists/tst.csv)")
    _timing_args(c)
    c.add_argument("--profile", action="store_true",
                   help="also show ONNX Runtime's CPU kernel time by node kind (convs blocked/plain, depthwise, "
                   "reorders, classifier) for both networks: why the slim one saves more or less than its MACs")
    c.add_argument("--out", help="output directory (default: CKPT.compare beside the checkpoint)")
    c.add_argument("--force", action="store_true", help="overwrite existing report files")
    c.set_defaults(func=_cmd_compare)

    v = sub.add_parser(
        "evolve", help="Knowledge Evolution: train generations with a KELS/WELS split",
        description="Train a network for several generations; each keeps the fit hypothesis, re-initialises "
        "the reset hypothesis and retrains the whole network with a fresh optimizer and schedule. After every "
        "generation the dense network and its fit hypothesis are evaluated. Writes genN/last.pt, metrics.jsonl, "
        "summary.md and generations.png; --resume continues an interrupted run from its last finished epoch.",
    )
    _from_scratch_args(v, "epochs per generation")
    v.add_argument("--split-mode", default="kels", choices=("kels", "wels"), help="KELS: a prefix of every layer's filters and kernels (has a slim network); WELS: random weights")
    v.add_argument("--split-rate", type=_split_rate, default=0.5, help="fraction of each layer in the fit hypothesis, in (0, 1)")
    v.add_argument("--round-to", type=_positive_int, default=1,
                   help="round KELS widths up to a multiple of N (e.g. 8 or 16) so the slim network suits blocked "
                   "conv kernels; the paper's split is 1")
    v.add_argument("--generations", type=_positive_int, default=5, help="generations N1..NG; each re-initialises the reset hypothesis")
    _run_args(v)
    v.set_defaults(func=_cmd_evolve)

    t = sub.add_parser(
        "train", help="plain training from a seeded random init (e.g. the teachers of a merge)",
        description="Train a registry network from scratch with the loop evolve uses (SGD, cosine with warm-up). "
        "Writes last.pt, metrics.jsonl, summary.md and curves.png; --resume continues from the last finished epoch.",
    )
    _from_scratch_args(t, "training epochs")
    t.add_argument("--subset-seed", type=int, default=0, help="which --train-per-class subset (default 0, independent of --seed)")
    _run_args(t)
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser(
        "merge", help="merge two teachers into one network of their size (concatenate, L0 gates, keep half, fine-tune)",
        description="Concatenate two teachers of one architecture into a double-width student whose logits are the "
        "mean of theirs, learn channel importance with hard-concrete L0 gates, keep the better half of every "
        "channel group with the same surgery as extract, and fine-tune. Writes big.pt, compressed.pt, last.pt, "
        "metrics.jsonl, summary.md, gates.png and curves.png.",
    )
    g.add_argument("teachers", nargs="*", help="the two teacher checkpoints (slimkit, or plain state_dicts with --arch); "
                   "--resume remembers them")
    g.add_argument("--arch", help="architecture of plain state_dict teachers (see `slimkit models`)")
    g.add_argument("--num-classes", type=_positive_int, help="classes of plain state_dict teachers")
    g.add_argument("--gate-epochs", type=_positive_int, default=30, help="epochs of importance learning")
    g.add_argument("--gate-lr", type=_positive_float, default=0.5, help="Adam learning rate of the gates' log alpha")
    g.add_argument("--lr", type=_positive_float, default=0.01, help="peak SGD learning rate of the weights while the gates learn")
    g.add_argument("--warmup-epochs", type=int, default=5, help="warm-up epochs of the gate phase")
    g.add_argument("--lambda-init", type=_positive_float, default=1.0, help="initial weight of the half-open penalty")
    g.add_argument("--lambda-step", type=float, default=1.0, help="lambda += step*sqrt(lambda) after every gate epoch")
    g.add_argument("--finetune-epochs", type=_positive_int, default=30, help="epochs of fine-tuning the compressed student")
    g.add_argument("--finetune-lr", type=_positive_float, default=0.01, help="peak SGD learning rate of fine-tuning")
    g.add_argument("--finetune-warmup-epochs", type=int, default=1, help="warm-up epochs of fine-tuning")
    _optim_args(g)
    _data_args(g)
    g.add_argument("--subset-seed", type=int, default=0, help="the --train-per-class subset the teachers were trained on")
    _run_args(g)
    g.set_defaults(func=_cmd_merge, batch_size=32)

    d = sub.add_parser(
        "den", help="lifelong learning with Dynamically Expandable Networks, against the paper's baselines",
        description="Learn a sequence of tasks with DEN (selective retraining, expansion with group sparsity, "
        "split/duplication, timestamped inference) and, on the same tasks, the baselines DNN, DNN-L2, EWC, "
        "DNN-STL and DNN-MTL. Writes task*.pt, metrics.jsonl, results.json, summary.md (accuracy matrix, "
        "forgetting, capacity, units selected/added/pruned/duplicated) and den.png.",
    )
    d.add_argument("--data", default="digits", help="'digits' or a dataset directory (ImageFolder train/ test/)")
    d.add_argument("--tasks", default="split", help="split[:N] | onevsrest[:N] | permuted:N (default split: 5 tasks of 2 classes)")
    d.add_argument("--arch", default="mlp", help="mlp (312-128), mlp:W1,W2,... or conv:C1,C2,... (3x3 convs whose "
                   "units are channels)")
    d.add_argument("--image-size", type=_positive_int, default=8, help="images are resized to this square size")
    d.add_argument("--epochs", type=_positive_int, default=30, help="epochs per task and phase")
    d.add_argument("--lr", type=_positive_float, default=0.05, help="SGD learning rate of every DEN step")
    d.add_argument("--batch-size", type=_positive_int, default=32, help="images per training step")
    d.add_argument("--l1", type=_nonneg_float, default=3e-3, help="mu: L1 (proximal) on task 1, new heads and new units")
    d.add_argument("--l1-head", type=_nonneg_float, default=1e-2, help="L1 on a new task's head (sparser heads select fewer units)")
    d.add_argument("--l2", type=_nonneg_float, default=1e-4, help="L2 of selective retraining")
    d.add_argument("--train-per-class", type=_positive_int, default=None,
                   help="train on a subset (seeded by --seed) of at most this many images per class (default: all)")
    d.add_argument("--expand-on", choices=("val", "train"), default="val",
                   help="val: after task t, expand when its accuracy on --val-fraction of its training images (held "
                   "out) is more than --tau-val below a network trained on task t alone; train: the paper's rule, "
                   "training loss after selective retraining above --tau (small sets reach ~0 loss: it never fires)")
    d.add_argument("--val-fraction", type=_positive_float, default=0.2,
                   help="share of every class of a task held out for the val rule (at least 1 image)")
    d.add_argument("--tau-val", type=_nonneg_float, default=0.02, help="accuracy margin of the val rule")
    d.add_argument("--tau", type=_nonneg_float, default=0.05, help="train rule: expand when the task loss stays above tau")
    d.add_argument("-k", "--k", type=_positive_int, default=10, help="units added per hidden layer on expansion")
    d.add_argument("--group-lasso", type=_nonneg_float, default=0.05, help="gamma: group lasso on new units' incoming weights")
    d.add_argument("--drift-lambda", type=_nonneg_float, default=0.1, help="lambda of ||W^t - W^(t-1)||^2 before the split")
    d.add_argument("--sigma", type=_nonneg_float, default=0.2, help="duplicate units whose drift exceeds sigma")
    d.add_argument("--baselines", default=",".join(("dnn", "dnn-l2", "ewc", "stl", "mtl")),
                   help="comma-separated subset of dnn,dnn-l2,ewc,stl,mtl, or none")
    d.add_argument("--seed", type=int, default=0, help="seeds the tasks, initialisation and shuffling")
    d.add_argument("--device", default="auto", help="auto (CUDA when a GPU is visible) | cpu | cuda")
    d.add_argument("--out", help="new run directory (must be empty or absent)")
    d.add_argument("--resume", help="continue the run in this directory after its last finished task or baseline "
                   "(same settings)")
    d.set_defaults(func=_cmd_den)

    m = sub.add_parser("models", help="list the model sources slimkit can build, with arguments, input and cut status")
    m.add_argument("--filter", help="only names containing this text (e.g. efficientnet, timm/resnet)")
    m.set_defaults(func=_cmd_models)
    return p


RUN_VERBS = ("evolve", "train", "merge", "den")
_NOT_SETTINGS = {"verb", "func", "out", "resume", "device"}  # flags a resume may change or that name the run


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the optional flags written on the command line (abbreviations are off)."""
    given = set()
    for action in parser._actions:
        if any(tok == o or (o.startswith("--") and tok.startswith(o + "=")) for tok in argv for o in action.option_strings):
            given.add(action.dest)
    return given


def _invocation(args: argparse.Namespace) -> dict:
    """The verb's settings as given, JSON-normalised (recorded in the run's config.json)."""
    rec = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    if rec.get("teachers"):
        from pathlib import Path

        rec["teachers"] = [str(Path(t).resolve()) for t in rec["teachers"]]
    return json.loads(json.dumps(rec))


def _resume_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """--resume DIR: take the run's recorded flags; a flag given now that contradicts them is refused."""
    from slimkit.errors import SlimkitError
    from slimkit.training.rundir import saved_invocation

    saved = saved_invocation(args.resume)
    if saved is None:
        return  # a run started from Python, or none: the settings must be given (RunDir.check compares them)
    now, given = _invocation(args), _given(parser, argv)
    for dest in sorted(given - _NOT_SETTINGS):
        if dest in saved and now.get(dest) != saved[dest]:
            flag = "--" + dest.replace("_", "-")
            raise SlimkitError(f"cannot resume {args.resume}: it was run with {flag} {saved[dest]!r}, now "
                               f"{now.get(dest)!r}; resume without {flag} or choose a new --out")
    for dest, value in saved.items():
        if dest not in given and not (dest == "teachers" and args.teachers):  # teachers may be named anew
            setattr(args, dest, value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from slimkit.errors import SlimkitError

    try:
        if args.verb in RUN_VERBS:
            from slimkit.training.rundir import INVOCATION

            verb_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.verb]
            if args.resume is not None:
                _resume_flags(verb_parser, args, argv)
            token = INVOCATION.set(_invocation(args))
            try:
                return args.func(args)
            finally:
                INVOCATION.reset(token)
        return args.func(args)
    except SlimkitError as exc:
        sys.stderr.write(f"slimkit {args.verb}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("slimkit: interrupted\n")
        return 130
    except BrokenPipeError:  # `slimkit models | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # not the user's mistake: say so, exit 1, traceback on request
        return _internal_error(args, exc)


def _internal_error(args: argparse.Namespace, exc: Exception) -> int:
    import os
    import traceback

    from slimkit.errors import one_line

    if args.debug or os.environ.get("SLIMKIT_DEBUG") == "1":
        traceback.print_exc()
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        sys.stderr.write(f"slimkit {args.verb}: out of memory: {one_line(exc, 200)}; try a smaller --batch-size "
                         "or input\n")
        return 1
    hint = "" if args.debug else "; rerun with --debug (or SLIMKIT_DEBUG=1) for the traceback"
    sys.stderr.write(f"slimkit {args.verb}: internal error ({type(exc).__name__}: {one_line(exc, 200)}): this is a "
                     f"slimkit bug, please report it{hint}\n")
    return 1
