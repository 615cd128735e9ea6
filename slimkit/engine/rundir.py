"""The run directory every training verb (train, evolve, merge, den) writes, and how it resumes.

A run directory holds ``config.json`` (the settings; a resume must match them), ``metrics.jsonl``
(one JSON record per line), ``state.pt`` (everything needed to continue) and the verb's checkpoints,
summaries and plots. Every write goes through :class:`RunDir`:

- files are written atomically (a temporary file, then a rename), ``metrics.jsonl`` line by line
  with an fsync, so a crash leaves either the old or the new file, and at worst a torn last line;
- ``state.pt`` records how many metrics lines were written when it was saved. A resume cuts
  ``metrics.jsonl`` back to that count: records of work done after the last state (and a torn line)
  are dropped, and the redone work logs them again. A run killed before its first state restarts.
- each write is a *boundary*: tests stop a run at every boundary in turn
  (:func:`slimkit.engine.testhooks.crash_at`) and check that the resumed run ends exactly like an
  uninterrupted one.

Only rank 0 writes; every rank reads the state it resumes from.
"""
from __future__ import annotations

import contextvars
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from slimkit.core.errors import SlimkitError, one_line
from slimkit.core.fileio import atomic_write
from slimkit.engine.testhooks import active as _test_hook

__all__ = ["RunDir", "STATE_FORMAT", "INVOCATION", "saved_invocation"]

STATE_FORMAT = 1  # version of state.pt's layout; a newer one is refused


# The command line that started a run (the verb's flags), recorded in config.json under "cli" so that
# `--resume DIR` needs no flags retyped. Set by the CLI around a verb; library calls leave it unset.
INVOCATION: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("invocation", default=None)


def _boundary(what: str) -> None:
    hook = _test_hook()
    if hook is not None:
        hook.boundary(what)


def _stale(path: Path) -> bool:
    """A temporary file an interrupted atomic write left behind (never a result)."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


class RunDir:
    """One run's directory. ``check`` on every rank before anything is written, then ``begin`` on rank 0.

    Args:
        out: the directory.
        verb: the verb's name, for messages.
        config: the settings (JSON-able); written on a new run, compared on resume.
        resume: continue the run in ``out`` instead of starting one.
        main: whether this process writes (rank 0).
        before: for settings added since, the value a run whose config.json predates them used (it is
            compared on resume in place of the missing key; a key missing from both compares as None).
    """

    def __init__(self, out: str | os.PathLike, verb: str, config: dict[str, Any], resume: bool, main: bool = True,
                 before: dict[str, Any] | None = None):
        self.out, self.verb, self.resume, self.main = Path(out), verb, resume, main
        self.before = json.loads(json.dumps(before or {}))
        self.config = json.loads(json.dumps(config))  # as it is written: tuples read back as lists
        self.metrics = self.out / "metrics.jsonl"
        self.state: dict[str, Any] | None = None  # the state resumed from (None: start from scratch)
        self._lines = 0  # metrics lines written (or kept) so far

    # --- before anything is written ----------------------------------------------------------------
    def check(self) -> "RunDir":
        """Refuse a bad directory or resume in one line; writes nothing. On resume, loads the state."""
        out = self.out
        if not self.resume:
            if out.exists() and (not out.is_dir() or any(not _stale(p) for p in out.iterdir())):
                raise SlimkitError(f"output directory {out} is not empty; use --resume {out} to continue it "
                                   "or choose a new --out")
            if not out.parent.is_dir():
                raise SlimkitError(f"cannot create {out}: directory {out.parent} does not exist")
            return self
        cfg_path = out / "config.json"
        if not cfg_path.is_file():
            raise SlimkitError(f"cannot resume: {out} holds no {self.verb} run (no config.json)")
        try:
            saved = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise SlimkitError(f"cannot resume: {cfg_path} is not valid JSON (torn or edited)") from exc
        if not isinstance(saved, dict):
            raise SlimkitError(f"cannot resume: {cfg_path} is not a {self.verb} configuration")
        saved = {**self.before, **saved}  # an older run's config lacks the settings added since
        diff = [k for k in self.config if saved.get(k) != self.config[k]]  # "cli" (the flags) is not compared
        if diff:
            k = diff[0]
            raise SlimkitError(f"cannot resume {out}: it was run with {k}={saved.get(k)!r}, now {k}={self.config[k]!r}; "
                               "resume with the same settings or choose a new --out")
        self.state = self._read_state()
        kept = self.state["metrics_lines"] if self.state is not None else 0
        lines = self._metric_lines()
        if len(lines) < kept:
            raise SlimkitError(f"cannot resume {out}: metrics.jsonl has {len(lines)} complete records but state.pt "
                               f"was saved after {kept}; the run directory was edited or truncated")
        self._lines = kept
        return self

    def _read_state(self) -> dict[str, Any] | None:
        path = self.out / "state.pt"
        if not path.exists():
            return None  # stopped before its first state: the run starts again from scratch
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, torn or not a torch file
            raise SlimkitError(f"cannot resume: {path} is unreadable ({one_line(exc, 120)})") from exc
        if not isinstance(st, dict) or "metrics_lines" not in st:
            raise SlimkitError(f"cannot resume: {path} is not a slimkit {self.verb} state")
        if int(st.get("format", 0)) > STATE_FORMAT:
            raise SlimkitError(f"cannot resume: {path} has state format {st['format']}, newer than this slimkit "
                               f"reads ({STATE_FORMAT}); upgrade slimkit")
        return st

    def _metric_lines(self) -> list[str]:
        """The complete, parseable records of metrics.jsonl (a torn last line is not one)."""
        if not self.metrics.exists():
            return []
        lines = []
        for line in self.metrics.read_text().split("\n"):
            try:
                json.loads(line)
            except ValueError:
                break  # a torn line ends what was written completely
            lines.append(line)
        return lines

    # --- writing (rank 0) ----------------------------------------------------------------------------
    def begin(self) -> "RunDir":
        """New run: create the directory and write config.json. Resume: cut metrics back to the state."""
        if not self.main:
            return self
        for p in self.out.glob(".*.tmp") if self.out.is_dir() else ():
            p.unlink()  # temporary files of writes a crash interrupted
        if self.resume:
            kept = self._metric_lines()[: self._lines]
            self.write_text("metrics.jsonl", "".join(line + "\n" for line in kept))
        else:
            self.out.mkdir(exist_ok=True)
            cli = INVOCATION.get()
            config = {**self.config, "cli": cli} if cli is not None else self.config
            self.write_text("config.json", json.dumps(config, indent=2) + "\n")
        return self

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (flushed to disk)."""
        if not self.main:
            return
        line = json.dumps(record) + "\n"
        hook = _test_hook()
        with open(self.metrics, "a") as f:
            if hook is not None and hook.tears():
                f.write(line[: len(line) // 2])
                f.flush()
                hook.boundary("metrics line, torn")
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._lines += 1
        _boundary("metrics line")

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The records logged so far (all ranks can read them; rank 0 wrote them)."""
        recs = [json.loads(line) for line in self._metric_lines()[: self._lines] if line.strip()]
        return [r for r in recs if kind is None or r.get("kind") == kind]

    def save_state(self, state: dict[str, Any]) -> None:
        """Write state.pt: what a resume continues from, with the metrics line count at this point."""
        if self.main:
            self._atomic("state.pt", lambda tmp: torch.save(
                {**state, "format": STATE_FORMAT, "metrics_lines": self._lines}, tmp))

    def write_text(self, name: str, text: str) -> Path:
        return self._atomic(name, lambda tmp: tmp.write_text(text))

    def write_figure(self, name: str, fig, dpi: int = 110) -> Path:
        """Save a matplotlib figure (:func:`slimkit.core.plots.figure`, no pyplot state to close) atomically."""
        return self._atomic(name, lambda tmp: fig.savefig(tmp, dpi=dpi, format=Path(name).suffix[1:]))

    def save_model(self, model: torch.nn.Module, name: str, **meta: Any) -> Path:
        """A self-describing checkpoint (``slimkit.save``, itself atomic) inside the run directory."""
        from slimkit.models.checkpoint import save

        path = self.out / name
        path.parent.mkdir(exist_ok=True)
        save(model, path, force=True, **meta)
        _boundary(name)
        return path

    def _atomic(self, name: str, writer: Callable[[Path], None]) -> Path:
        path = self.out / name
        hook = _test_hook()
        if hook is not None and hook.tears():  # the temporary file is written but never renamed into place
            tmp = path.with_name(f".{path.name}.torn.tmp")
            writer(tmp)
            hook.boundary(f"{name}, torn")
        atomic_write(path, writer, force=True)
        _boundary(name)
        return path


def saved_invocation(out: str | os.PathLike) -> dict[str, Any] | None:
    """The flags recorded in ``out``/config.json by the command that started the run (None if none)."""
    try:
        saved = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # no run or a damaged one: RunDir.check says so in its own words
    return saved.get("cli") if isinstance(saved, dict) and isinstance(saved.get("cli"), dict) else None
