"""The verbs that train: evolve, train, merge, den (one run directory each, resumable)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from slimkit.cli.options import (
    data_args,
    fail,
    finetune_args,
    finish_verb,
    from_scratch_args,
    kd_args,
    network_args,
    nonneg_float,
    optim_args,
    out_arg,
    positive_float,
    positive_int,
    run_args,
    split_rate,
    subset_seed_arg,
    weights_args,
)


def _train_config(args: argparse.Namespace, epochs: int | None = None, lr: float | None = None,
                  warmup_epochs: int | None = None):
    from slimkit.engine.loop import TrainConfig

    return TrainConfig(epochs=epochs or args.epochs, batch_size=args.batch_size, lr=lr or args.lr,
                       warmup_epochs=args.warmup_epochs if warmup_epochs is None else warmup_epochs,
                       weight_decay=args.weight_decay, loss=args.loss, seed=args.seed)


def _run_dir(verb: str, args: argparse.Namespace) -> str:
    out = args.resume or args.out
    if out is None:
        raise SystemExit(fail(verb, "give -o/--out DIR for a new run or --resume DIR to continue one"))
    return out


def rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes and speaks


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not args.quiet


def _finish(verb: str, args: argparse.Namespace, out: str, result: Any, wrote: str) -> int:
    """Say what the run wrote (rank 0 only): one JSON report with --json, else one line."""
    if not rank0():
        return 0
    if args.json:
        files = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())
        print(json.dumps({"verb": verb, "out": str(out), "files": files, "result": result}, indent=2, default=str))
    else:
        print(f"wrote {out}/{wrote}")
    return 0


def _launch(verb: str, args: argparse.Namespace, run, wrote: str) -> int:
    """Start or resume a training run in --out/--resume."""
    out = _run_dir(verb, args)
    result = run(out, resume=args.resume is not None, progress=_progress(args), device=args.device,
                 workers=args.workers)
    return _finish(verb, args, out, result, wrote)


def _image_size(args: argparse.Namespace) -> int | None:
    """--image-size of a verb that trains from scratch, also said as --input-shape C,H,W: the images are
    resized to H x H squares and the data decides the channels, so C and H = W must agree with them."""
    if args.input_shape is None:
        return args.image_size
    from slimkit.core.errors import SlimkitError
    from slimkit.engine.epochs import input_kwargs

    c, h, w = args.input_shape
    shown = f"--input-shape {c},{h},{w}"
    if h != w:
        raise SlimkitError(f"{shown}: training resizes images to squares; give H == W (or --image-size {max(h, w)})")
    if args.image_size is not None and args.image_size != h:
        raise SlimkitError(f"{shown} and --image-size {args.image_size} disagree; give one of them")
    kw = input_kwargs(args.arch, args.data, h)
    channels = kw["input_shape"][0] if "input_shape" in kw else kw.get("in_chans", 1 if args.data == "digits" else 3)
    if c != channels:
        raise SlimkitError(f"{shown}: {args.arch} trained on {args.data} takes {channels}-channel images, not {c}")
    return h


def _cmd_evolve(args: argparse.Namespace) -> int:
    from slimkit.methods.ke.evolve import EvolveConfig, evolve

    cfg = EvolveConfig(arch=args.arch, data=args.data, split_mode=args.split_mode, split_rate=args.split_rate,
                       generations=args.generations, image_size=_image_size(args),
                       train_per_class=args.train_per_class, subset_seed=args.subset_seed, round_to=args.round_to,
                       eval_every=args.eval_every, num_classes=args.num_classes, augment=args.augment,
                       model_args=args.model_args, train=_train_config(args))
    return _launch("evolve", args, lambda out, **kw: evolve(cfg, out, **kw),
                   "summary.md, generations.png, metrics.jsonl and gen*/last.pt")


def _cmd_train(args: argparse.Namespace) -> int:
    from slimkit.engine.train import TrainRunConfig, train

    cfg = TrainRunConfig(arch=args.arch, data=args.data, image_size=_image_size(args),
                         train_per_class=args.train_per_class, subset_seed=args.subset_seed,
                         eval_every=args.eval_every, num_classes=args.num_classes, augment=args.augment,
                         model_args=args.model_args, slim=args.slim, teacher=args.teacher, kd_weight=args.kd_weight,
                         kd_temperature=args.kd_temperature, train=_train_config(args))
    return _launch("train", args, lambda out, **kw: train(cfg, out, **kw),
                   "last.pt, summary.md, curves.png and metrics.jsonl")


def _cmd_merge(args: argparse.Namespace) -> int:
    from slimkit.methods.merge.merging import MergeConfig, merge

    cfg = MergeConfig(data=args.data, train_per_class=args.train_per_class, subset_seed=args.subset_seed,
                      gate=_train_config(args, args.gate_epochs, args.lr, args.warmup_epochs),
                      finetune=_train_config(args, args.finetune_epochs, args.finetune_lr, args.finetune_warmup_epochs),
                      gate_lr=args.gate_lr, lambda_init=args.lambda_init, lambda_step=args.lambda_step,
                      eval_every=args.eval_every, augment=args.augment)
    return _launch("merge", args, lambda out, **kw: merge(cfg, args.teachers, out, arch=args.arch,
                                                           num_classes=args.num_classes, ema=args.ema,
                                                           state_key=args.state_key, model_args=args.model_args,
                                                           input_shape=args.input_shape, **kw),
                   "big.pt, compressed.pt, last.pt, summary.md, gates.png, curves.png and metrics.jsonl")


def _cmd_den(args: argparse.Namespace) -> int:
    from slimkit.methods.den.config import DENConfig
    from slimkit.methods.den.sequence import run_den

    hidden, channels = (312, 128), ()
    kind, _, widths = args.arch.partition(":")
    if kind not in ("mlp", "conv") or (kind == "conv" and not widths):
        raise SystemExit(fail("den", f"--arch must be mlp, mlp:W1,W2,... or conv:C1,C2,... (units are channels), "
                                     f"got {args.arch!r}"))
    if widths:
        try:
            parsed = tuple(int(w) for w in widths.split(","))
        except ValueError:
            raise SystemExit(fail("den", f"--arch {kind}:... needs integer widths, got {args.arch!r}")) from None
        hidden, channels = (parsed, ()) if kind == "mlp" else ((), parsed)
    baselines = () if args.baselines == "none" else tuple(b for b in args.baselines.split(",") if b)
    cfg = DENConfig(data=args.data, tasks=args.tasks, hidden=hidden, channels=channels, image_size=args.image_size,
                    epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, l1=args.l1, l1_head=args.l1_head,
                    l2=args.l2, tau=args.tau, k=args.k, group=args.group_lasso, drift_lambda=args.drift_lambda,
                    sigma=args.sigma, baselines=baselines, seed=args.seed, train_per_class=args.train_per_class,
                    subset_seed=args.subset_seed,
                    expand_on=args.expand_on, val_fraction=args.val_fraction, tau_val=args.tau_val)
    out = _run_dir("den", args)
    result = run_den(cfg, out, progress=_progress(args), resume=args.resume is not None, device=args.device)
    return _finish("den", args, out, result, "summary.md, den.png, results.json, metrics.jsonl and task*.pt")


def add_parsers(sub) -> None:
    v = sub.add_parser(
        "evolve", help="Knowledge Evolution: train generations with a KELS/WELS split",
        description="Train a network for several generations; each keeps the fit hypothesis, re-initialises "
        "the reset hypothesis and retrains the whole network with a fresh optimizer and schedule. After every "
        "generation the dense network and its fit hypothesis are evaluated. Writes genN/last.pt, metrics.jsonl, "
        "summary.md and generations.png; --resume continues an interrupted run from its last finished epoch.",
    )
    from_scratch_args(v, "epochs per generation")
    v.add_argument("--split-mode", default="kels", choices=("kels", "wels"), help="KELS: a prefix of every layer's filters and kernels (has a slim network); WELS: random weights")
    v.add_argument("--split-rate", type=split_rate, default=0.5, help="fraction of each layer in the fit hypothesis, in (0, 1)")
    v.add_argument("--round-to", type=positive_int, default=1,
                   help="round KELS widths up to a multiple of N (e.g. 8 or 16) so the slim network suits blocked "
                   "conv kernels; the paper's split is 1")
    v.add_argument("--generations", type=positive_int, default=5, help="generations N1..NG; each re-initialises the reset hypothesis")
    run_args(v)
    finish_verb(v, _cmd_evolve)

    t = sub.add_parser(
        "train", help="plain training from a seeded random init (the teachers of a merge; --slim: the scratch route)",
        description="Train a registry network from scratch with the loop evolve uses (SGD, cosine with warm-up). "
        "--slim R trains the fit hypothesis's architecture instead (the network cut to its KELS widths at split "
        "rate R, initialised afresh); --teacher distils a trained network into it. Writes last.pt, metrics.jsonl, "
        "summary.md and curves.png; --resume continues from the last finished epoch.",
    )
    from_scratch_args(t, "training epochs")
    t.add_argument("--slim", type=split_rate, metavar="R",
                   help="train the fit hypothesis's architecture at split rate R in (0, 1): every layer at its KELS "
                   "width ceil(R*C), as `extract --split-rate R` would cut it, initialised as the source initialises "
                   "itself")
    kd_args(t)
    run_args(t)
    finish_verb(t, _cmd_train)

    g = sub.add_parser(
        "merge", help="merge two teachers into one network of their size (concatenate, L0 gates, keep half, fine-tune)",
        description="Concatenate two teachers of one architecture into a double-width student whose logits are the "
        "mean of theirs, learn channel importance with hard-concrete L0 gates, keep the better half of every "
        "channel group with the same surgery as extract, and fine-tune. Writes big.pt, compressed.pt, last.pt, "
        "metrics.jsonl, summary.md, gates.png and curves.png.",
    )
    g.add_argument("teachers", nargs="*", help="the two teacher checkpoints (slimkit, or plain state_dicts with --arch); "
                   "--resume remembers them")
    network_args(g)
    weights_args(g, "the teachers' training checkpoints")
    g.add_argument("--gate-epochs", type=positive_int, default=30, help="epochs of importance learning")
    g.add_argument("--gate-lr", type=positive_float, default=0.5, help="Adam learning rate of the gates' log alpha")
    g.add_argument("--lr", type=positive_float, default=0.01, help="peak SGD learning rate of the weights while the gates learn")
    g.add_argument("--warmup-epochs", type=int, default=5, help="warm-up epochs of the gate phase")
    g.add_argument("--lambda-init", type=positive_float, default=1.0, help="initial weight of the half-open penalty")
    g.add_argument("--lambda-step", type=float, default=1.0, help="lambda += step*sqrt(lambda) after every gate epoch")
    finetune_args(g, "the compressed student")
    optim_args(g)
    data_args(g)
    run_args(g)
    finish_verb(g, _cmd_merge, batch_size=32)

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
    d.add_argument("--image-size", type=positive_int, default=8, help="images are resized to this square size")
    d.add_argument("--epochs", type=positive_int, default=30, help="epochs per task and phase")
    d.add_argument("--lr", type=positive_float, default=0.05, help="SGD learning rate of every DEN step")
    d.add_argument("--batch-size", type=positive_int, default=32, help="images per training step")
    d.add_argument("--l1", type=nonneg_float, default=3e-3, help="mu: L1 (proximal) on task 1, new heads and new units")
    d.add_argument("--l1-head", type=nonneg_float, default=1e-2, help="L1 on a new task's head (sparser heads select fewer units)")
    d.add_argument("--l2", type=nonneg_float, default=1e-4, help="L2 of selective retraining")
    d.add_argument("--train-per-class", type=positive_int, default=None,
                   help="train on a subset (drawn from --subset-seed) of at most this many images per class "
                   "(default: all)")
    subset_seed_arg(d)
    d.add_argument("--expand-on", choices=("val", "train"), default="val",
                   help="val: after task t, expand when its accuracy on --val-fraction of its training images (held "
                   "out) is more than --tau-val below a network trained on task t alone; train: the paper's rule, "
                   "training loss after selective retraining above --tau (small sets reach ~0 loss: it never fires)")
    d.add_argument("--val-fraction", type=positive_float, default=0.2,
                   help="share of every class of a task held out for the val rule (at least 1 image)")
    d.add_argument("--tau-val", type=nonneg_float, default=0.02, help="accuracy margin of the val rule")
    d.add_argument("--tau", type=nonneg_float, default=0.05, help="train rule: expand when the task loss stays above tau")
    d.add_argument("-k", "--k", type=positive_int, default=10, help="units added per hidden layer on expansion")
    d.add_argument("--group-lasso", type=nonneg_float, default=0.05, help="gamma: group lasso on new units' incoming weights")
    d.add_argument("--drift-lambda", type=nonneg_float, default=0.1, help="lambda of ||W^t - W^(t-1)||^2 before the split")
    d.add_argument("--sigma", type=nonneg_float, default=0.2, help="duplicate units whose drift exceeds sigma")
    d.add_argument("--baselines", default=",".join(("dnn", "dnn-l2", "ewc", "stl", "mtl")),
                   help="comma-separated subset of dnn,dnn-l2,ewc,stl,mtl, or none")
    d.add_argument("--seed", type=int, default=0, help="seeds the task permutations, initialisation and shuffling")
    d.add_argument("--device", default="auto", help="auto (CUDA when a GPU is visible) | cpu | cuda")
    out_arg(d, "new run directory (must be empty or absent)")
    d.add_argument("--resume", help="continue the run in this directory after its last finished task or baseline "
                   "(same settings)")
    finish_verb(d, _cmd_den)


RUN_VERBS = ("evolve", "train", "merge", "den", "prune", "routes")
# flags a resume may change, that name the run, or that only shape what is printed
_NOT_SETTINGS = {"verb", "func", "out", "resume", "device", "debug", "json", "quiet"}


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the optional flags written on the command line (abbreviations are off)."""
    given = set()
    for action in parser._actions:
        if any(tok == o or (o.startswith("--") and tok.startswith(o + "=")) for tok in argv for o in action.option_strings):
            given.add(action.dest)
    return given


def invocation(args: argparse.Namespace) -> dict:
    """The verb's settings as given, JSON-normalised (recorded in the run's config.json)."""
    rec = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    if rec.get("teachers"):
        rec["teachers"] = [str(Path(t).resolve()) for t in rec["teachers"]]
    for key in ("ckpt", "teacher"):  # files are recorded absolute: a resume from elsewhere finds them
        if rec.get(key):
            rec[key] = str(Path(rec[key]).resolve())
    return json.loads(json.dumps(rec))


def resume_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """--resume DIR: take the run's recorded flags; a flag given now that contradicts them is refused."""
    from slimkit.core.errors import SlimkitError
    from slimkit.engine.rundir import saved_invocation

    saved = saved_invocation(args.resume)
    if saved is None:
        return  # a run started from Python, or none: the settings must be given (RunDir.check compares them)
    if "subset_seed" not in saved and args.verb in ("evolve", "den"):  # recorded before --subset-seed: it was --seed
        saved = {**saved, "subset_seed": saved.get("seed", 0)}
    now, given = invocation(args), given_flags(parser, argv)
    for dest in sorted(given - _NOT_SETTINGS):
        if dest in saved and now.get(dest) != saved[dest]:
            flag = "--" + dest.replace("_", "-")
            raise SlimkitError(f"cannot resume {args.resume}: it was run with {flag} {saved[dest]!r}, now "
                               f"{now.get(dest)!r}; resume without {flag} or choose a new --out")
    for dest, value in saved.items():
        if dest not in _NOT_SETTINGS | given and not (dest in ("teachers", "ckpt") and getattr(args, dest)):
            # the input files may be named anew (a moved file): the run's settings still have to match
            setattr(args, dest, value)
