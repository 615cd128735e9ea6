"""What every verb's parser shares: the help formatter, argument types and the flag groups."""
from __future__ import annotations

import argparse
import json
import sys


class DefaultsFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the text already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --gen for --generations would hide from --resume's flag check
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse prints usage + message over two lines; we print one
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def split_rate(text: str) -> float:
    from slimkit.core.errors import SlimkitError
    from slimkit.core.plan import check_split_rate

    try:
        return check_split_rate(text)
    except SlimkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def int_at_least(low: int, allowed: str):
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


positive_int = int_at_least(1, "a positive integer")
workers_count = int_at_least(0, "0 (load in the training process) or more")


def augment_arg(p: argparse.ArgumentParser) -> None:
    from slimkit.data.augment import AUGMENT_HELP, AUGMENTS

    p.add_argument("--augment", default="auto", choices=("auto", *AUGMENTS), metavar="PRESET", help=AUGMENT_HELP)


def model_args(text: str) -> dict:
    """``depth=56,width=32`` (or a JSON object) -> constructor arguments; values parse as JSON scalars."""
    text = text.strip()
    if text.startswith("{"):
        try:
            out = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object: {exc}") from exc
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


def real(positive: bool):
    """argparse type for a finite number, > 0 (``positive``) or >= 0."""
    import math

    word = "positive" if positive else "non-negative"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"must be a {word} number, got {text!r}") from exc
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise argparse.ArgumentTypeError(f"must be a {word} number, got {text!r}")
        return v

    return parse


positive_float, nonneg_float = real(True), real(False)


def fail(verb: str, msg: str) -> int:
    sys.stderr.write(f"slimkit {verb}: error: {msg}\n")
    return 2


def warn(parser: argparse.ArgumentParser, message: str) -> None:
    """One warning line on stderr, named after the verb (``slimkit VERB: warning: ...``)."""
    sys.stderr.write(f"{parser.prog}: warning: {message}\n")


def input_shape(text: str) -> tuple:
    """argparse type of --input-shape: C,H,W (an old N,C,H,W is passed on for ShapeAction to warn about)."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be C,H,W integers like 3,64,64, got {text!r}") from exc
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be three positive integers C,H,W, got {text!r}")
    return shape


class ShapeAction(argparse.Action):
    """--input-shape: C,H,W; the old N,C,H,W form still works for one release, with a deprecation line
    (N is dropped: the batch axis is always dynamic)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 4:
            warn(parser, f"{option_string} N,C,H,W is deprecated; give C,H,W (the batch axis is always dynamic, "
                 f"{values[0]} is ignored)")
            values = values[1:]
        setattr(namespace, self.dest, tuple(values))


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: works for one release, with one deprecation line on stderr."""

    def __init__(self, option_strings, dest, use: str, **kwargs):
        self.use = use
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn(parser, f"{option_string} is deprecated; use {self.use}")
        setattr(namespace, self.dest, values)


ARCH_HELP = ("the network: a built-in or torchvision name, timm/NAME, or package.module:callable (see `slimkit "
             "models`); a checkpoint needs it only when it is a plain state_dict (a slimkit checkpoint names its own, "
             "and naming the import path it was built by allows that import)")
NUM_CLASSES_HELP = "classes of the network (default: a checkpoint's classifier, or the classes of the training data)"
MODEL_ARGS_HELP = ("other constructor arguments of the network, e.g. depth=56,width=32 or a JSON object (see "
                   "`slimkit models`); a slimkit checkpoint records its own")
INPUT_SHAPE_HELP = ("C,H,W input of the network (default: a slimkit checkpoint's recorded input, else the model "
                    "source's, e.g. a timm model's config); the batch axis stays dynamic")


def network_args(p: argparse.ArgumentParser, arch_default: str | None = None, shape: bool = True) -> None:
    """--arch --num-classes --model-args --input-shape: how every verb that reads or builds a network names
    it (one meaning and one parser everywhere). Training verbs default --arch to the network they build, and
    read --input-shape as the data's channels and square side (cli/train_verbs.py); ``shape=False`` where a
    verb has no input shape to name."""
    p.add_argument("--arch", default=arch_default, help=ARCH_HELP)
    p.add_argument("--num-classes", type=positive_int, help=NUM_CLASSES_HELP)
    p.add_argument("--model-args", type=model_args, metavar="K=V,...", help=MODEL_ARGS_HELP)
    if shape:
        p.add_argument("--input-shape", type=input_shape, action=ShapeAction, metavar="C,H,W", help=INPUT_SHAPE_HELP)


def out_arg(p: argparse.ArgumentParser, help: str, old_output: bool = False) -> None:
    """-o/--out: where every verb that writes puts its output; ``old_output``: the verb's former --output
    still works for one release (extract, export)."""
    p.add_argument("-o", "--out", help=help)
    if old_output:
        p.add_argument("--output", dest="out", action=DeprecatedAlias, use="-o/--out")


def source_args(p: argparse.ArgumentParser, shape: bool = True, resumable: bool = False) -> None:
    """CKPT and the flags that say what a plain state_dict is: shared by every verb reading a checkpoint.
    ``resumable``: a run verb, whose --resume remembers CKPT (then it may be left out)."""
    p.add_argument("ckpt", nargs="?" if resumable else None,
                   help="slimkit checkpoint, or (with --arch) a state_dict, training checkpoint (timm, "
                   "torchvision, Lightning) or safetensors file, or an official KE checkpoint"
                   + ("; --resume remembers it" if resumable else ""))
    network_args(p, shape=shape)
    weights_args(p)


def weights_args(p: argparse.ArgumentParser, whose: str = "the checkpoint") -> None:
    """--ema and --state-key: which weights of a training checkpoint; every verb reading a network has them."""
    p.add_argument("--ema", action="store_true",
                   help=f"use the EMA weights of {whose} (timm state_dict_ema, torchvision model_ema, ...)")
    p.add_argument("--state-key", metavar="KEY",
                   help=f"the entry of {whose} holding the weights, when it has several (a dotted path for "
                   "nested entries, e.g. callbacks.EMA.ema_state_dict)")


def timing_args(p: argparse.ArgumentParser) -> None:
    """How to time: shared by bench and compare."""
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt (ONNX Runtime) | torch (eager, CPU)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: all cores)")
    p.add_argument("--warmup", type=positive_int, default=10, help="untimed runs per model and batch")
    p.add_argument("--runs", type=positive_int, default=50, help="timed runs per model and batch")


def int8_args(p: argparse.ArgumentParser, table: bool = False) -> None:
    """INT8 calibration and accuracy budget: shared by export --int8 and compare --precision ...,int8."""
    if not table:
        p.add_argument("--int8", action="store_true",
                       help="quantize the fp32 graph to INT8 (ONNX Runtime static QDQ, per-channel weights, settings "
                       "chosen for this CPU); needs --calib")
    p.add_argument("--calib", help="calibration images: 'digits', a dataset directory (its train/ split, else test/ "
                   "or val/) or a .npy array (N,C,H,W) of preprocessed inputs")
    p.add_argument("--calib-size", type=int_at_least(16, "at least 16 (fewer images give activation ranges that "
                   "clip held-out images)"), help="calibration images, a seeded selection (default 256)")
    p.add_argument("--max-drop", type=nonneg_float, default=1.0,
                   help="accuracy points INT8 may lose against fp32 on --data" if not table else
                   "accuracy budget: an artefact qualifies when its accuracy is at least dense fp32's minus this many points")


def optim_args(p: argparse.ArgumentParser) -> None:
    """Optimiser and loss flags shared by the training verbs."""
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per training step")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty on every parameter (SGD weight decay)")
    p.add_argument("--loss", default="ce", choices=("ce", "smooth", "cskd"),
                   help="cross-entropy, label smoothing 0.1, or CS-KD (class-wise self-distillation, T=4)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, masks, shuffling and augmentation: same seed, same CPU run")


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="'digits' or a dataset directory (ImageFolder train/ test/, or KE lists/)")
    p.add_argument("--train-per-class", type=positive_int, help="seeded per-class subset of the training split")
    subset_seed_arg(p)
    p.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every N epochs (and at the end)")
    augment_arg(p)


SUBSET_SEED = 0  # the one default of --subset-seed (and of every library config's subset_seed)


def subset_seed_arg(p: argparse.ArgumentParser) -> None:
    """--subset-seed: which --train-per-class subset, in every training verb (independent of --seed)."""
    p.add_argument("--subset-seed", type=int, default=SUBSET_SEED,
                   help="which --train-per-class subset: the same value draws the same images in train, evolve, "
                   f"merge and den, whatever --seed is (default {SUBSET_SEED})")


def finetune_args(p: argparse.ArgumentParser, what: str) -> None:
    """The fine-tuning phase of a verb that trains a network it was handed (merge's student, prune's cut)."""
    p.add_argument("--finetune-epochs", type=positive_int, default=30, help=f"epochs of fine-tuning {what}")
    p.add_argument("--finetune-lr", type=positive_float, default=0.01, help="peak SGD learning rate of fine-tuning")
    p.add_argument("--finetune-warmup-epochs", type=int, default=1, help="warm-up epochs of fine-tuning")


def kd_args(p: argparse.ArgumentParser, teacher: bool = True) -> None:
    """Knowledge distillation's flags: shared by train, prune (with --teacher) and routes (its distill route)."""
    if teacher:
        p.add_argument("--teacher", metavar="CKPT",
                       help="distil this trained network (a slimkit checkpoint with the same input and classes) into "
                       "the one trained: (1 - w) CE + w T^2 KL(teacher || student) on the same augmented batches")
    p.add_argument("--kd-weight", type=nonneg_float, default=0.5, help="w, the weight of the teacher's soft targets, in [0, 1]")
    p.add_argument("--kd-temperature", type=positive_float, default=4.0, help="T, the softmax temperature of both networks")


def from_scratch_args(p: argparse.ArgumentParser, epochs_help: str) -> None:
    """Network, schedule, optimiser and data flags of the verbs that train a registry net from scratch."""
    network_args(p, arch_default="cifar_resnet")
    p.add_argument("--epochs", type=positive_int, default=30, help=epochs_help)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine with warm-up)")
    p.add_argument("--warmup-epochs", type=int, default=5, help="linear learning-rate warm-up epochs before the cosine decay")
    optim_args(p)
    data_args(p)
    p.add_argument("--image-size", type=positive_int,
                   help="square input side the data is resized to (default: 16 for the built-in small nets; a "
                   "torchvision, timm or own model's default input, e.g. 224)")


def run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when a GPU is visible) | cpu | cuda; CUDA trains "
                   "under bf16 autocast with channels_last")
    out_arg(p, "new run directory (must be empty or absent)")
    p.add_argument("--resume", help="continue the run in this directory (same settings)")
    p.add_argument("--workers", type=workers_count, default=None,
                   help="loader processes for image directories (default: one per CPU less one, at most 8, and 0 "
                   "below 4 CPUs; 0 loads in the training process); results do not depend on it")


def finish_verb(p: argparse.ArgumentParser, func, force: str | None = None, **defaults) -> None:
    """The flags every verb ends with: --force (for verbs that write files), --json, --quiet; then its function."""
    if force:
        p.add_argument("--force", action="store_true", help=force)
    report_args(p)
    p.set_defaults(func=func, **defaults)


def report_args(p: argparse.ArgumentParser) -> None:
    """--json and --quiet: the same meaning in every verb."""
    p.add_argument("--json", action="store_true",
                   help="print one machine-readable JSON report on stdout (and nothing else there); files go "
                   "where --out/-o says")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress or information lines on stderr (warnings and errors still show)")
