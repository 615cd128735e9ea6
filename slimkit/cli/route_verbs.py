"""The verbs of the routes to a slim network: prune (a trained network cut by importance, fine-tuned) and
routes (every route on the user's data at one budget, one table). `train --slim` is in train_verbs."""
from __future__ import annotations

import argparse

from slimkit.cli.options import (
    data_args,
    fail,
    finetune_args,
    finish_verb,
    from_scratch_args,
    kd_args,
    optim_args,
    positive_float,
    positive_int,
    run_args,
    source_args,
    split_rate,
    timing_args,
)
from slimkit.cli.train_verbs import _image_size, _launch, _train_config


def _cmd_prune(args: argparse.Namespace) -> int:
    from slimkit.methods.routes.pruning import PruneRunConfig, prune_run

    if args.ckpt is None:
        raise SystemExit(fail("prune", "give the trained network to prune (CKPT), or --resume DIR to continue a run"))
    cfg = PruneRunConfig(ckpt=args.ckpt, split_rate=args.split_rate, criterion=args.criterion, data=args.data,
                         train_per_class=args.train_per_class, subset_seed=args.subset_seed,
                         eval_every=args.eval_every, augment=args.augment, taylor_batches=args.taylor_batches,
                         arch=args.arch, num_classes=args.num_classes, model_args=args.model_args,
                         input_shape=args.input_shape, ema=args.ema, state_key=args.state_key, teacher=args.teacher,
                         kd_weight=args.kd_weight, kd_temperature=args.kd_temperature,
                         finetune=_train_config(args, args.finetune_epochs, args.finetune_lr,
                                                args.finetune_warmup_epochs))
    return _launch("prune", args, lambda out, **kw: prune_run(cfg, out, **kw),
                   "last.pt (pruned and fine-tuned), summary.md, curves.png and metrics.jsonl")


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers like 0,1,2, got {text!r}") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct comma-separated integers like 0,1,2, got {text!r}")
    return seeds


def _cmd_routes(args: argparse.Namespace) -> int:
    from slimkit.deploy.bench import parse_batches
    from slimkit.methods.routes.run import RoutesConfig, run_routes

    cfg = RoutesConfig(arch=args.arch, data=args.data, split_rate=args.split_rate, budget=args.budget,
                       epochs=args.epochs, seeds=args.seeds, routes=tuple(r for r in args.routes.split(",") if r),
                       criterion=args.criterion, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                       kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, image_size=_image_size(args),
                       train_per_class=args.train_per_class, subset_seed=args.subset_seed, model_args=args.model_args,
                       num_classes=args.num_classes, augment=args.augment, lr=args.lr,
                       warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, weight_decay=args.weight_decay,
                       loss=args.loss, latency_batches=tuple(parse_batches(args.batch)), provider=args.provider,
                       threads=args.threads, warmup=args.warmup, runs=args.runs)
    return _launch("routes", args, lambda out, **kw: run_routes(cfg, out, **kw),
                   "routes.md, routes.json, routes.png, pick.pt and seed*/ (one run per route)")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune a trained network to the KELS widths by an importance criterion, then fine-tune (the "
        "prune route)",
        description="Rank the channels of a trained network with torch-pruning's importance (l1, l2, taylor; or the "
        "kels prefix), keep the top ceil(R*C) of every coupled group (the KELS widths of --split-rate R, so the "
        "network equals the fit hypothesis's architecture), cut them with the one surgery, verify the cut against "
        "the masked network, and fine-tune on --data. Writes last.pt, metrics.jsonl, summary.md and curves.png; "
        "--resume continues from the last finished epoch.",
    )
    source_args(p, resumable=True)
    p.add_argument("--split-rate", type=split_rate, default=0.5, help="fraction of each layer's channels kept, in (0, 1)")
    p.add_argument("--criterion", default="l1",
                   help="l1 | l2 (weight magnitude of every coupled layer) | taylor (|w * dL/dw| on --taylor-batches "
                   "training batches) | kels (the KELS prefix)")
    p.add_argument("--taylor-batches", type=positive_int, default=8, help="training batches the taylor criterion reads")
    finetune_args(p, "the pruned network")
    optim_args(p)
    data_args(p)
    kd_args(p)
    run_args(p)
    finish_verb(p, _cmd_prune)

    r = sub.add_parser(
        "routes", help="every route to the same slim network (KE, scratch, prune, distill) on your data at one "
        "budget: one table, a plot and the pick",
        description="Train, for each seed, the dense network for the whole budget, Knowledge Evolution for "
        "budget/epochs generations (its first generation is dense N1, the paper's baseline) and its fit hypothesis, "
        "the fit hypothesis's architecture from scratch, the dense network pruned to it and fine-tuned, and the "
        "scratch network distilled from the dense one. Every slim network has the KELS widths of --split-rate. "
        "Writes routes.md (test accuracy mean ± sd, parameters, MACs, ONNX Runtime latency, what each route "
        "trained), routes.json, routes.png and pick.pt (the most accurate slim network); --resume continues after "
        "the last finished epoch of the run a crash interrupted.",
    )
    from_scratch_args(r, "epochs of one KE generation and of dense N1")
    r.add_argument("--split-rate", type=split_rate, default=0.5, help="the slim network's KELS split rate, in (0, 1)")
    r.add_argument("--budget", type=positive_int, default=300,
                   help="training epochs of every route (a whole number of --epochs generations, at least two)")
    r.add_argument("--seeds", type=_seeds, default="0,1,2", help="training seeds, comma-separated")
    r.add_argument("--routes", default="dense,ke,scratch,prune,distill",
                   help="which routes, comma-separated (prune and distill need dense, which is added)")
    r.add_argument("--criterion", default="l1", help="prune's importance: l1 | l2 | taylor | kels")
    r.add_argument("--finetune-epochs", type=positive_int, help="prune's fine-tuning epochs (default: --epochs)")
    r.add_argument("--finetune-lr", type=positive_float, default=0.01, help="prune's fine-tuning learning rate")
    kd_args(r, teacher=False)
    timing_args(r)
    run_args(r)
    finish_verb(r, _cmd_routes)
