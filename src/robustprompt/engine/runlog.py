"""What a run leaves behind for a reader: ``log.txt``, ``scalars.csv``, TensorBoard events, and
progress bars that suit a cluster log.

- ``log.txt`` (in the run directory): every record of the ``robustprompt`` logger while the run
  is open, plus the command's own summary lines (``tee_to_log``), appended on resume with one
  header line per start.
- ``scalars.csv``: append-only, long format ``wall_time,step,tag,value`` (one row per scalar, as
  TensorBoard's own CSV export), so a resumed run or a new tag never rewrites the header.
- TensorBoard (``report_to=("tensorboard",)``): the same scalars as event files in
  ``<run>/tensorboard``; tensorboard is an optional dependency, imported only then.
- ``progress_bar``: tqdm; when its stream is not a terminal, one plain line every ``interval``
  seconds instead of carriage-return redraws.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TextIO

from tqdm.auto import tqdm

from ..errors import ConfigError

log = logging.getLogger("robustprompt")

REPORTERS = ("tensorboard",)
LOG_FILE = "log.txt"
SCALARS_FILE = "scalars.csv"
SCALAR_HEADER = ("wall_time", "step", "tag", "value")
NON_TTY_INTERVAL_S = 30.0
# a log line without the bar graphic: "eval fashion_mnist: 40% 400/1000 [01:02<01:33, 6.4img/s, …]"
LINE_FORMAT = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

_active: Optional["RunLog"] = None      # the run open in this process (one at a time)
_last_log: Optional[Path] = None        # log.txt of the last run opened, for the summary lines


def parse_report_to(value: Optional[str | Sequence[str]]) -> tuple[str, ...]:
    """``"tensorboard"``, ``"none"``, a comma list or a sequence -> validated reporter names."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    names = [n for n in names if n != "none"]
    for n in names:
        if n == "wandb":
            raise ConfigError("--report-to wandb is not supported yet; use tensorboard (the scalars are "
                              "also in the run's scalars.csv)")
        if n not in REPORTERS:
            raise ConfigError(f"--report-to: unknown reporter {n[:40]!r}; choose from none, "
                              f"{', '.join(REPORTERS)}")
    return tuple(dict.fromkeys(names))


def require_reporters(value: Optional[str | Sequence[str]]) -> tuple[str, ...]:
    """parse_report_to, then import each reporter's package now (before any work) so a missing
    one is a one-line ConfigError at the start, not after training."""
    names = parse_report_to(value)
    if "tensorboard" in names:
        _import_summary_writer()
    return names


def _import_summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # torch's module imports the tensorboard package itself
        raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") \
            from None
    return SummaryWriter


def _tensorboard_writer(folder: Path) -> Any:
    return _import_summary_writer()(log_dir=str(folder))


class _RunFileHandler(logging.FileHandler):
    """The robustprompt logger's records, appended to log.txt with a time stamp."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))


class RunLog:
    """Scalars of one run: ``add(tag, value, step)`` -> scalars.csv (+ TensorBoard)."""

    def __init__(self, folder: Path, report_to: Sequence[str] = (), enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self._tb = _tensorboard_writer(self.folder / "tensorboard") if enabled and "tensorboard" in report_to \
            else None
        self._csv: Optional[TextIO] = None
        if enabled:
            path = self.folder / SCALARS_FILE
            fresh = not path.exists() or path.stat().st_size == 0
            self._csv = path.open("a", encoding="utf-8", newline="")
            if fresh:
                csv.writer(self._csv).writerow(SCALAR_HEADER)

    def add(self, tag: str, value: float, step: int) -> None:
        """One scalar row; a no-op on processes other than the main one."""
        if not self.enabled or self._csv is None:
            return
        value = float(value)
        csv.writer(self._csv).writerow((f"{time.time():.3f}", int(step), tag, repr(value)))
        self._csv.flush()   # a row per line, complete even if the run is killed
        if self._tb is not None:
            self._tb.add_scalar(tag, value, int(step))

    def add_many(self, scalars: dict[str, Any], step: int, prefix: str = "") -> None:
        """Every int/float entry of ``scalars`` (bools and others skipped) as ``prefix + key``."""
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.add(prefix + key, value, step)

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def active() -> Optional[RunLog]:
    """The RunLog of the run open in this process, if any (the progress helper logs into it)."""
    return _active


@contextlib.contextmanager
def run_logging(folder: Path, command: str, *, main_process: bool = True,
                report_to: Sequence[str] = ()) -> Iterator[RunLog]:
    """While open: robustprompt log records also go to ``folder/log.txt`` (after a header line
    naming the command and the start time) and scalars to ``folder/scalars.csv``. Other processes
    of a multi-process run write nothing."""
    global _active, _last_log
    folder = Path(folder)
    handler = None
    if main_process:
        path = folder / LOG_FILE
        with path.open("a", encoding="utf-8") as f:
            f.write(f"==== robustprompt {command} started {time.strftime('%Y-%m-%d %H:%M:%S')} "
                    f"(pid {os.getpid()}) ====\n")
        handler = _RunFileHandler(path)
        log.addHandler(handler)
        _last_log = path
    scalars = RunLog(folder, report_to, enabled=main_process)
    previous, _active = _active, scalars
    try:
        yield scalars
    finally:
        _active = previous
        scalars.close()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def last_log_path() -> Optional[Path]:
    """log.txt of the last run this process opened (None if none)."""
    return _last_log


class _Tee:
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


@contextlib.contextmanager
def tee_to_log(path: Optional[Path]) -> Iterator[None]:
    """Whatever is printed to stdout inside also goes to ``path`` (appended); nothing if None."""
    if path is None or not path.parent.is_dir():
        yield
        return
    with path.open("a", encoding="utf-8") as f:
        out = sys.stdout
        sys.stdout = _Tee(out, f)  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout = out


class _LineStream:
    """A file for tqdm on a non-terminal: each redraw (``\\r`` + bar) becomes one line; blank
    redraws, and redraws whose count is unchanged (tqdm's closing one), are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = ""

    def write(self, s: str) -> int:
        for part in s.replace("\n", "\r").split("\r"):
            text = part.rstrip()
            key = text.split(" [", 1)[0]   # "desc: 40% 2/5": the timing part always changes
            if text and key != self._last:
                self.stream.write(text + "\n")
                self._last = key
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, desc: str, unit: str, *, disable: bool = False, stream: Optional[TextIO] = None,
                 interval: float = NON_TTY_INTERVAL_S) -> tqdm:
    """A tqdm bar on ``stream`` (default stderr). On a terminal: redrawn in place. Otherwise
    (a cluster log, a pipe): one plain line at most every ``interval`` seconds, and the last."""
    stream = sys.stderr if stream is None else stream
    if _is_tty(stream):
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=stream)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=_LineStream(stream),
                mininterval=interval, maxinterval=max(interval, 1.0), miniters=1, bar_format=LINE_FORMAT)
