"""`slimkit VERB`: the parser, logging set-up and the one place errors become exit codes.

User mistakes (SlimkitError, bad arguments) print one line on stderr and exit 2; anything else is a
slimkit bug: exit 1, one line saying so. --debug (or SLIMKIT_DEBUG=1) adds the traceback to both,
with the chained cause of a user error (e.g. the parser's or torch's own exception).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import slimkit.cli.deploy_verbs as deploy_verbs  # the verb modules themselves, not the package (which imports this one)
import slimkit.cli.route_verbs as route_verbs
import slimkit.cli.train_verbs as train_verbs
from slimkit.cli.options import Parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from slimkit import __version__

    p = Parser(prog="slimkit", description="Make trained networks physically smaller and faster, and prove it.")
    p.add_argument("--version", action="version", version=f"slimkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error (also SLIMKIT_DEBUG=1)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    deploy_verbs.add_parsers(sub)
    train_verbs.add_parsers(sub)
    route_verbs.add_parsers(sub)
    return p


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("SLIMKIT_DEBUG") == "1"


def configure_logging(quiet: bool, debug: bool) -> None:
    """slimkit's information lines go to stderr as plain text; --quiet keeps only warnings and errors."""
    log = logging.getLogger("slimkit")
    for h in [h for h in log.handlers if getattr(h, "slimkit_cli", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.slimkit_cli = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.verb == "bench" and any(str(e).endswith((".json", ".png")) for e in extra):  # the old --json/--plot FILE
            sys.stderr.write("slimkit bench: error: --json now prints the report on stdout and --plot is gone: "
                             "--out DIR writes bench.json, bench.md and bench.png\n")
            return 2
        parser.error(f"unrecognized arguments: {' '.join(map(str, extra))}")
    configure_logging(getattr(args, "quiet", False), _debug(args))
    from slimkit.core.errors import SlimkitError

    try:
        if args.verb in train_verbs.RUN_VERBS:
            from slimkit.engine.rundir import INVOCATION

            verb_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.verb]
            if args.resume is not None:
                train_verbs.resume_flags(verb_parser, args, argv)
            token = INVOCATION.set(train_verbs.invocation(args))
            try:
                return args.func(args)
            finally:
                INVOCATION.reset(token)
        return args.func(args)
    except SlimkitError as exc:
        if _debug(args):  # the user's mistake, but --debug shows where it was caught and its cause
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"slimkit {args.verb}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("slimkit: interrupted\n")
        return 130
    except BrokenPipeError:  # `slimkit models | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # not the user's mistake: say so, exit 1, traceback on request
        return _internal_error(args, exc)


def _internal_error(args: argparse.Namespace, exc: Exception) -> int:
    import traceback

    from slimkit.core.errors import one_line

    if _debug(args):
        traceback.print_exc()
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        sys.stderr.write(f"slimkit {args.verb}: out of memory: {one_line(exc, 200)}; try a smaller --batch-size "
                         "or input\n")
        return 1
    hint = "" if _debug(args) else "; rerun with --debug (or SLIMKIT_DEBUG=1) for the traceback"
    sys.stderr.write(f"slimkit {args.verb}: internal error ({type(exc).__name__}: {one_line(exc, 200)}): this is a "
                     f"slimkit bug, please report it{hint}\n")
    return 1
