"""One directory per run: resolved config, per-image records, metrics — written so that a killed
run never leaves a half-written result file, a restart picks up where it stopped, two processes
never share a directory, and `--overwrite` never deletes anything this toolkit did not write.

Layout:
  .robustprompt-run.json  the marker: kind, toolkit version, config hash, creation time
  .robustprompt.lock      locked (filelock: flock / LockFileEx) by the process running in the
                          directory; PID and command
  config.yaml             the fully resolved configuration (written first)
  records.<hash>.part-<r>.jsonl  per-process records while running (one JSON line per image);
                          <hash> is the config's, so records of two configurations never mix
  records.jsonl           all records, sorted by index (written atomically at the end)
  metrics.json            the summary (written atomically, last: its presence means "complete")
  prompts.safetensors, method_state.safetensors, checkpoints/   (train)

Guarantees:
- a directory is a run directory only if it holds the marker (or, written before the marker
  existed, a config.yaml of a known kind); anything else that is not empty is refused;
- `--overwrite` deletes only the names listed in TOOLKIT_NAMES / the patterns below, and refuses
  a pre-marker directory that holds anything else;
- the main process holds an exclusive OS file lock on the directory from before it reads anything
  until the run ends (the kernel releases it if the process dies, even on kill -9); a second
  process is refused with the holder's PID and command, or waits if asked (`wait_for_lock`).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import filelock
import yaml

from ..errors import ConfigError, DatasetError, ModelError, RobustPromptError, StorageError
from ..paths import atomic_write_text, storage_error

log = logging.getLogger("robustprompt")
# "run directory: PATH" lines: the CLI prints them on stdout; a library caller sees them only if it
# configures this logger (they are INFO, below logging's last-resort level)
announce = logging.getLogger("robustprompt.rundir")

MARKER = ".robustprompt-run.json"
LOCK = ".robustprompt.lock"
RUN_KINDS = ("eval", "tta", "train")
KINDS = (*RUN_KINDS, "experiment")

# Keys that change how fast a run goes, not what it computes; they may differ on resume.
# eval/tta records are per image and do not depend on batching (tests/test_rundir_safety.py);
# training's data order, augmentation and gradient averaging do, so only device and progress.
RUNTIME_KEYS = ("device", "data.workers", "data.batch_size", "progress", "adaptive_attack.chunk")
TRAIN_RUNTIME_KEYS = ("device", "progress")

# Identity keys added with the marker: a directory written before them lacks them entirely.
FINGERPRINT_KEYS = ("model.fingerprint", "data.fingerprint")
_HINTS = {"model.fingerprint.prompts": "the prompts file changed",
          "model.fingerprint.weights": "the backbone weights changed",
          "data.fingerprint": "the images, labels or classes changed"}

# Everything the toolkit writes at the top of a run or experiment directory, and in checkpoints/.
TOOLKIT_NAMES = frozenset({"config.yaml", "metrics.json", "records.jsonl", "prompts.safetensors",
                           "method_state.safetensors", "experiment.yaml", "summary.json", "summary.md",
                           "log.txt", "scalars.csv", MARKER, LOCK})
_TOP_PATTERNS = (re.compile(r"records(\.[0-9a-f]{10})?\.part-\d+\.jsonl"),
                 re.compile(r"\.(prompts|extra)\.tmp\.safetensors"))      # temporaries of earlier versions
_CKPT_PATTERNS = (re.compile(r"epoch-\d+\.(safetensors|json)"), re.compile(r"\.epoch-\d+\.tmp\.safetensors"))
_TMP = re.compile(r"\.(?P<base>.+)\.tmp\d+")                                # paths.atomic_write_bytes
_EVENTS = re.compile(r"events\.out\.tfevents\.[\w.\-]+")                    # --report-to tensorboard


def _runtime_keys(config: dict) -> tuple[str, ...]:
    return TRAIN_RUNTIME_KEYS if config.get("kind") == "train" else RUNTIME_KEYS


def _drop(d: dict, dotted: str) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.get(k, {})
        if not isinstance(d, dict):
            return
    d.pop(keys[-1], None)


def _has(d: dict, dotted: str) -> bool:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return False
        d = d[k]
    return True


def semantic_config(config: dict) -> dict:
    """The config without its runtime-only keys (see RUNTIME_KEYS / TRAIN_RUNTIME_KEYS)."""
    out = json.loads(json.dumps(config))
    for k in _runtime_keys(config):
        _drop(out, k)
    return out


def config_hash(config: dict) -> str:
    blob = json.dumps(semantic_config(config), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


# ---------------------------------------------------------------------------- what is ours
def is_toolkit_name(name: str) -> bool:
    """True for a file name this toolkit writes at the top of a run or experiment directory."""
    if name in TOOLKIT_NAMES or any(p.fullmatch(name) for p in _TOP_PATTERNS):
        return True
    m = _TMP.fullmatch(name)
    return bool(m) and (is_toolkit_name(m["base"]) or _is_checkpoint_name(m["base"]))


def _is_checkpoint_name(name: str) -> bool:
    if any(p.fullmatch(name) for p in _CKPT_PATTERNS):
        return True
    m = _TMP.fullmatch(name)
    return bool(m) and _is_checkpoint_name(m["base"])


def _foreign_entries(path: Path) -> list[str]:
    """Entries of a run directory that this toolkit did not write (checkpoints/ looked into)."""
    out = []
    for entry in sorted(path.iterdir()):
        if entry.name == "checkpoints" and entry.is_dir() and not entry.is_symlink():
            out += [f"checkpoints/{e.name}" for e in sorted(entry.iterdir())
                    if not (e.is_file() and _is_checkpoint_name(e.name))]
        elif entry.name == "tensorboard" and entry.is_dir() and not entry.is_symlink():
            out += [f"tensorboard/{e.name}" for e in sorted(entry.iterdir())
                    if not (e.is_file() and _EVENTS.fullmatch(e.name))]
        elif not (is_toolkit_name(entry.name) and (entry.is_file() or entry.is_symlink())):
            out.append(entry.name)
    return out


# What a run directory holds once it has recorded anything: per-image records, metrics, prompts,
# method state, a checkpoint. A marked folder with none of these (only config.yaml, the marker,
# the lock) never got that far and may be reused by a different configuration without --overwrite.
_RESULT_NAMES = frozenset({"metrics.json", "records.jsonl", "prompts.safetensors", "method_state.safetensors"})


def holds_results(path: Path) -> bool:
    """True if run directory `path` holds any result, or anything robustprompt did not write
    (then it is never reused without --overwrite)."""
    if _foreign_entries(path):
        return True
    for entry in path.iterdir():
        name = _TMP.fullmatch(entry.name)["base"] if _TMP.fullmatch(entry.name) else entry.name
        if name in _RESULT_NAMES or _TOP_PATTERNS[0].fullmatch(name) or entry.name == "checkpoints":
            return True
    return False


def _delete_toolkit_files(path: Path) -> None:
    """Delete what the toolkit wrote in `path` (never the lock, never anything else)."""
    try:
        for entry in path.iterdir():
            if entry.name == "checkpoints" and entry.is_dir() and not entry.is_symlink():
                for e in entry.iterdir():
                    if e.is_file() and _is_checkpoint_name(e.name):
                        e.unlink()
                if not any(entry.iterdir()):
                    entry.rmdir()
            elif entry.name == "tensorboard" and entry.is_dir() and not entry.is_symlink():
                for e in entry.iterdir():
                    if e.is_file() and _EVENTS.fullmatch(e.name):
                        e.unlink()
                if not any(entry.iterdir()):
                    entry.rmdir()
            elif entry.name != LOCK and is_toolkit_name(entry.name) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
    except OSError as exc:
        raise StorageError(f"cannot clear {str(path)[:200]} for --overwrite: {exc.strerror or exc}") from exc


def _read_marker(path: Path) -> Optional[dict]:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("kind") in KINDS and "robustprompt" in marker:
        return marker
    return None


def _read_yaml(file: Path) -> Optional[dict]:
    from ..config import parse_yaml  # bounded: a tampered run folder cannot alias-bomb us

    try:
        data = parse_yaml(file.read_text(), str(file))
    except (OSError, ValueError, yaml.YAMLError, RobustPromptError):
        return None
    return data if isinstance(data, dict) else None


def inspect_dir(path: Path) -> tuple[str, Optional[str]]:
    """What `path` is: ("missing" | "empty", None), ("marked", kind) — it holds our marker —,
    ("legacy", kind) — written before the marker: a config.yaml of a known kind, or an
    experiment.yaml —, or ("foreign", None): not empty and not ours."""
    if not path.exists():
        return "missing", None
    if not any(e.name != LOCK for e in path.iterdir()):
        return "empty", None
    marker = _read_marker(path)
    if marker is not None:
        return "marked", marker["kind"]
    old = _read_yaml(path / "config.yaml")
    if old is not None and old.get("kind") in RUN_KINDS:
        return "legacy", old["kind"]
    if (path / "experiment.yaml").is_file() and _read_yaml(path / "experiment.yaml") is not None:
        return "legacy", "experiment"
    return "foreign", None


def check_out_dir(path: str | os.PathLike) -> None:
    """A one-line ConfigError, before any work, when `path` cannot be a run directory: it is a
    file, it lies under a file, or the nearest existing folder is not writable."""
    p = Path(path)
    shown = str(p)[:200]
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {shown} is an existing file, not a folder; choose a folder for the run")
    ancestor = p.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--out {shown} cannot be created: {str(ancestor)[:200]} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {shown}: no permission to write in {str(ancestor)[:200]}")


def _refuse_foreign(path: Path) -> ConfigError:
    return ConfigError(f"{str(path)[:200]} is not a robustprompt run directory (no marker) and is not empty; "
                       "refusing to write or delete anything in it — choose a new or empty --out")


# ---------------------------------------------------------------------------- the lock
class DirLock:
    """An exclusive OS lock (`filelock.FileLock`: flock on Unix, LockFileEx on Windows) on
    `<dir>/.robustprompt.lock`, whose content names the owner's PID and command.

    The operating system drops the lock when its process dies (kill -9 included), so a stale file
    never blocks anyone. We remove the file on release, while still holding it; a process that was
    waiting on the removed file notices (the path names another file, or none) and locks anew."""

    def __init__(self, directory: Path) -> None:
        self.file = Path(directory) / LOCK
        self._lock: Optional[filelock.BaseFileLock] = None
        self._identity: Optional[tuple[int, int]] = None

    def acquire(self, wait: bool = False, patience_s: float = 0.0) -> None:
        """wait: until the holder finishes (announced once); otherwise held elsewhere for longer
        than `patience_s` seconds (0: at once) is a ConfigError naming the holder."""
        announced = False
        deadline = time.monotonic() + patience_s
        while True:
            lock = self._new_lock()
            try:
                held = self._try(lock, blocking=False)
                while not held and not wait and time.monotonic() < deadline:
                    held = self._try(lock, blocking=True, timeout=min(1.0, deadline - time.monotonic()))
                if not held:
                    if not wait:
                        raise ConfigError(f"{str(self.file.parent)[:200]} is in use by another robustprompt "
                                          f"process ({self.holder()}); two runs in one directory would mix "
                                          "their results — rerun when it has finished, or ask to wait for "
                                          "it (--wait; wait_for_lock=True in Python)")
                    if not announced:
                        print(f"waiting for {self.holder()} to finish with {str(self.file.parent)[:200]}",
                              file=sys.stderr, flush=True)
                        announced = True
                    # until the holder releases or dies; polled with a finite timeout because
                    # filelock refuses an unbounded wait on a file another lock object of this
                    # process holds (RuntimeError "Deadlock"), e.g. a Python caller's second run
                    while not self._try(lock, blocking=True):
                        pass
                if self._holds_path():
                    break
            except BaseException:
                self._drop(lock)
                raise
            self._drop(lock)   # the holder removed the file as it released it: lock the new one
        self._lock = lock

    def _new_lock(self) -> filelock.BaseFileLock:
        # preserve_lock_file: filelock never unlinks; release() does, while the lock is still held.
        # on_acquired hands us the locked descriptor: its identity, and the holder's line.
        return filelock.FileLock(self.file, timeout=-1, thread_local=False, preserve_lock_file=True,
                                 on_acquired=self._on_acquired)

    def _try(self, lock: filelock.BaseFileLock, blocking: bool, timeout: float = 1.0) -> bool:
        """Lock now (blocking=False) or within `timeout` seconds (blocking=True); False if still held."""
        try:
            lock.acquire(timeout=max(timeout, 0.0) if blocking else 0.0, blocking=blocking)
            return True
        except filelock.Timeout:
            return False
        except OSError as exc:
            raise storage_error(self.file, exc) from exc

    def _on_acquired(self, fd: int) -> None:
        st = os.fstat(fd)
        self._identity = (st.st_ino, st.st_dev)
        info = {"pid": os.getpid(), "command": " ".join(sys.argv)[:200],
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())

    def _holds_path(self) -> bool:
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_dev) == self._identity

    @staticmethod
    def _drop(lock: filelock.BaseFileLock) -> None:
        with contextlib.suppress(OSError):
            lock.release(force=True)

    def holder(self) -> str:
        """'PID 123, since …: robustprompt eval …' from the lock file, as far as it can be read."""
        try:
            info = json.loads(self.file.read_text())
            return f"PID {int(info['pid'])}, since {str(info.get('since'))[:40]}: {str(info.get('command'))[:200]}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its PID yet"

    def release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            if self._holds_path():
                self.file.unlink()   # while still holding it: nobody can have locked the new one
        self._drop(self._lock)
        self._lock = None
        self._identity = None


# ---------------------------------------------------------------------------- several processes
_SHARED_ERRORS = {c.__name__: c for c in (ConfigError, DatasetError, ModelError, StorageError, RobustPromptError)}


def on_main_then_share(state, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process only and hand its result to every process. If it raises, the
    other processes raise the same error (class and one-line message) instead of waiting forever
    at the next barrier. state: accelerate's PartialState, or None for a single process."""
    if state is None or state.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    if state.is_main_process:
        try:
            value = fn()
        except BaseException as exc:
            broadcast_object_list([("error", type(exc).__name__, str(exc)[:1000])])
            raise
        broadcast_object_list([("ok", value)])
        return value
    box: list[Any] = [None]
    broadcast_object_list(box)
    status = box[0]
    if status[0] == "ok":
        return status[1]
    raise _SHARED_ERRORS.get(status[1], RuntimeError)(status[2])


def _write_marker(path: Path, kind: str, chash: Optional[str]) -> None:
    from .. import __version__

    atomic_write_text(path / MARKER, json.dumps({
        "kind": kind, "robustprompt": __version__, "config_hash": chash,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "note": "written by robustprompt: --overwrite deletes only the files robustprompt writes here"},
        indent=2) + "\n")


def _claim(path: Path, kind: str, wait_for_lock: bool, patience_s: float = 0.0
           ) -> tuple[DirLock, str, Optional[str]]:
    """Check, create and lock `path`; returns the lock and what the directory was once locked."""
    check_out_dir(path)
    status, _ = inspect_dir(path)
    if status == "foreign":   # before writing anything (not even the lock file) into it
        raise _refuse_foreign(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    lock = DirLock(path)
    lock.acquire(wait_for_lock, patience_s)
    try:
        status, found = inspect_dir(path)   # again: it may have changed while we waited
        if status == "foreign":
            raise _refuse_foreign(path)
        if found is not None and (found == "experiment") != (kind == "experiment"):
            what = "an experiment folder" if found == "experiment" else f"a {found} run directory"
            raise ConfigError(f"{str(path)[:200]} is {what} of robustprompt, not a place for "
                              f"{'an experiment' if kind == 'experiment' else f'a {kind} run'}; choose another --out")
    except BaseException:
        lock.release()
        raise
    return lock, status, found


@contextlib.contextmanager
def experiment_dir(path: str | os.PathLike, state=None, *, wait_for_lock: bool = False, patience_s: float = 0.0,
                   on_claim: Optional[Callable[[], None]] = None) -> Iterator[Path]:
    """Claim an experiment's root folder for the block: the same rules as a run directory
    (marker, lock, a non-empty folder without a marker is refused). Its runs nest inside it, each
    a run directory of its own. `on_claim` runs once the folder is marked, under the lock, on the
    main process (its error reaches every process); `patience_s`: see DirLock.acquire."""
    path = Path(path)
    held: list[DirLock] = []

    def claim() -> None:
        lock, status, _ = _claim(path, "experiment", wait_for_lock, patience_s)
        held.append(lock)
        if status != "marked":
            _write_marker(path, "experiment", None)
        if on_claim is not None:
            on_claim()

    try:
        on_main_then_share(state, claim)
        yield path
    finally:
        for lock in held:
            lock.release()


# ---------------------------------------------------------------------------- run directories
def read_metrics(run_dir: Path) -> Optional[dict]:
    """A finished run's metrics.json; None while it is missing or unreadable (not finished)."""
    try:
        data = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunDir:
    def __init__(self, path: str | os.PathLike, config: dict, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.config = config
        self.overwrite = overwrite
        self.kind = str(config.get("kind", "eval"))
        self.hash = config_hash(config)
        self.mismatched: list[int] = []      # indices whose recorded image id disagreed (see load_records)
        self._legacy_parts = False           # also read records.part-<r>.jsonl (pre-marker naming)
        self._lock: Optional[DirLock] = None

    # ------------------------------------------------------------------ set-up
    @contextlib.contextmanager
    def open(self, state=None, *, wait_for_lock: bool = False) -> Iterator[bool]:
        """Claim the directory for this run and yield whether it resumes an earlier run with the
        same configuration. The main process checks, locks and prepares it (see `_prepare`);
        the others learn the outcome, or its error, from it. The lock is held until the block ends."""
        finished = False
        try:
            resumed = on_main_then_share(state, lambda: self._claim(wait_for_lock))
            yield resumed
            finished = True
        finally:
            if self._lock is not None:   # held by the main process only: it alone announces
                try:
                    if finished and self.metrics() is not None:
                        announce.info("run directory: %s", self.path)
                        update_latest(self.path, self.kind)
                finally:
                    self._lock.release()
                    self._lock = None

    def _claim(self, wait_for_lock: bool) -> bool:
        self._lock, status, _ = _claim(self.path, self.kind, wait_for_lock)
        resumed = self._prepare(status)
        # the folder's name ends in a hash the user never typed: say where the run goes
        announce.info("run directory: %s%s", self.path, " (resuming)" if resumed else "")
        return resumed

    def _prepare(self, status: str) -> bool:
        """With the lock held: resume the same run, refuse a different one, or (with overwrite)
        delete only the toolkit's files of the earlier run. Returns True on a resume."""
        cfg_file = self.path / "config.yaml"
        if status in ("marked", "legacy"):
            old = _read_yaml(cfg_file)
            same = old is not None and semantic_config(old) == semantic_config(self.config)
            adopt = (not same and status == "legacy" and old is not None
                     and semantic_config(old) == semantic_config(_without_fingerprints(self.config, old)))
            if (same or adopt) and not self.overwrite:
                if status == "legacy":
                    self._adopt_legacy(fingerprints_missing=adopt)
                return True
            # a run that never recorded a result (it failed at start) must not block its corrected
            # rerun: only our own files are there, and none of them is a result
            unused = status == "marked" and not holds_results(self.path)
            if not self.overwrite and not unused:
                if old is None:
                    raise ConfigError(f"{str(cfg_file)[:200]} is missing or unreadable; pass --overwrite to "
                                      "replace this run, or choose another --out")
                diff = _first_difference(semantic_config(old), semantic_config(self.config))
                raise ConfigError(f"{str(self.path)[:200]} holds a different run ({diff}); choose another --out "
                                  "or pass --overwrite to replace it")
            if not self.overwrite:
                announce.info("note: %s held a run that recorded no result; replacing it", str(self.path)[:200])
            if status == "legacy":
                foreign = _foreign_entries(self.path)
                if foreign:
                    raise ConfigError(f"{str(self.path)[:200]} was written before robustprompt marked its run "
                                      f"directories and also holds {foreign[0][:100]!r}, which robustprompt did "
                                      "not write; refusing to delete anything in it — move that away or choose "
                                      "another --out")
            _delete_toolkit_files(self.path)
        atomic_write_text(cfg_file, yaml.safe_dump(self.config, sort_keys=False))
        _write_marker(self.path, self.kind, self.hash)   # after config.yaml: a marker means a config exists
        return False

    def _adopt_legacy(self, fingerprints_missing: bool) -> None:
        """A run directory of an earlier version with this run's settings: resume it, reading its
        records under the old part-file names, and mark it. Its config gains this run's
        fingerprints, which its files could not be checked against — say so."""
        if fingerprints_missing:
            print(f"note: {str(self.path)[:200]} was written by an earlier robustprompt without fingerprints of "
                  "its prompts, weights and images; resuming it as the same run (its records are checked "
                  "against the image ids) — pass --overwrite to redo it from scratch", file=sys.stderr)
        self._legacy_parts = True
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
        _write_marker(self.path, self.kind, self.hash)

    # ------------------------------------------------------------------ records
    def part_file(self, rank: int) -> Path:
        return self.path / f"records.{self.hash}.part-{rank}.jsonl"

    def _part_files(self) -> list[Path]:
        """This configuration's part files only (and, in an adopted earlier-version directory,
        those of the old naming)."""
        own = sorted(self.path.glob(f"records.{self.hash}.part-*.jsonl"))
        legacy = sorted(self.path.glob("records.part-*.jsonl")) if self._legacy_parts else []
        return legacy + own

    def load_records(self, ids: Optional[Sequence[str]] = None) -> dict[int, dict]:
        """Every finished record, from the final file and this config's part files (index →
        record). A torn last line from a kill is ignored: that image is simply redone. With
        `ids` (the split's image ids), a record whose index is out of range or whose `id` is not
        the split's id at that index is dropped (and listed in `self.mismatched`): the image is redone."""
        out: dict[int, dict] = {}
        mismatched: set[int] = set()
        for f in [self.path / "records.jsonl"] + self._part_files():
            if not f.exists():
                continue
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    idx = int(rec["index"])
                except (ValueError, KeyError, TypeError):
                    continue
                if ids is not None and not (0 <= idx < len(ids) and rec.get("id") == ids[idx]):
                    mismatched.add(idx)
                    continue
                out[idx] = rec
        self.mismatched = sorted(mismatched - set(out))
        return out

    def rewrite_records(self, records: dict[int, dict]) -> None:
        """Replace this configuration's part files by one holding exactly `records` (atomically
        written first, then the other part files dropped): records that must be redone are gone."""
        body = "".join(json.dumps(records[i]) + "\n" for i in sorted(records))
        atomic_write_text(self.part_file(0), body)
        for f in self._part_files():
            if f != self.part_file(0):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    def append_records(self, rank: int, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if not lines:
            return
        part = self.part_file(rank)
        try:
            with open(part, "a") as fh:
                # a previous kill may have left a partial line: start ours on a fresh one
                if fh.tell() > 0:
                    with open(part, "rb") as check:
                        check.seek(-1, os.SEEK_END)
                        if check.read(1) != b"\n":
                            fh.write("\n")
                fh.write(lines)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:   # a torn line at worst: ignored on resume, earlier lines intact
            raise storage_error(part, exc) from exc

    def finalize(self, records: dict[int, dict], metrics: dict[str, Any]) -> None:
        """Write records.jsonl and metrics.json atomically, then drop this config's part files."""
        body = "".join(json.dumps(records[i]) + "\n" for i in sorted(records))
        atomic_write_text(self.path / "records.jsonl", body)
        atomic_write_text(self.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        for f in self._part_files():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    def metrics(self) -> Optional[dict]:
        """The finished run's metrics; None if absent or unreadable (then the run is finished again)."""
        return read_metrics(self.path)

    def write_json(self, name: str, payload: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(payload, indent=2) + "\n")


def update_latest(run: Path, kind: str) -> Optional[Path]:
    """Point `runs/latest-<kind>` at finished run directory `run` when `run` lies in a folder of
    runs of this kind (runs/eval, runs/train, runs/tta: the default layout). The pointer sits
    beside that folder, not in it, so runs/<kind>/ keeps holding run directories only. Updated
    atomically: a relative symlink, or, where symlinks cannot be made (Windows without the
    privilege), a text file holding the run's path relative to it. Returns the pointer, or None
    when `run` is not in such a folder."""
    parent = run.absolute().parent
    if parent.name != kind:
        return None
    pointer = parent.parent / f"latest-{kind}"
    tmp = parent.parent / f".latest-{kind}.tmp{os.getpid()}"
    target = f"{kind}/{run.name}"
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.symlink(target, tmp, target_is_directory=True)
        except (OSError, NotImplementedError):
            tmp.write_text(target + "\n")
        os.replace(tmp, pointer)   # a reader sees the old pointer or the new one, never none
    except OSError as exc:          # a convenience only: the run itself is complete
        log.warning("could not update %s: %s", pointer, exc.strerror or exc)
        return None
    return pointer


def _without_fingerprints(config: dict, old: dict) -> dict:
    """`config` without the fingerprint keys that `old` (an earlier version's config) lacks."""
    out = json.loads(json.dumps(config))
    for k in FINGERPRINT_KEYS:
        if not _has(old, k):
            _drop(out, k)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    hint = next((h for k, h in _HINTS.items() if where.startswith(k)), None)
    return f"{where[:200] or 'config'}: {_short(a)} there, {_short(b)} now" + (f" — {hint}" if hint else "")
