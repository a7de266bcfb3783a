"""One directory per run: resolved config, per-image records, metrics — written so that a killed
run never leaves a half-written result file and a restart picks up where it stopped.

Layout:
  config.yaml           the fully resolved configuration (written first)
  records.part-<r>.jsonl  per-process records while running (one JSON line per image)
  records.jsonl         all records, sorted by index (written atomically at the end)
  metrics.json          the summary (written atomically, last: its presence means "complete")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from ..errors import ConfigError
from ..paths import atomic_write_text

# Keys that change how fast a run goes, not what it computes; they may differ on resume.
RUNTIME_KEYS = ("device", "data.workers", "data.batch_size", "progress")


def _drop(d: dict, dotted: str) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.get(k, {})
        if not isinstance(d, dict):
            return
    d.pop(keys[-1], None)


def semantic_config(config: dict) -> dict:
    out = json.loads(json.dumps(config))
    for k in RUNTIME_KEYS:
        _drop(out, k)
    return out


def config_hash(config: dict) -> str:
    blob = json.dumps(semantic_config(config), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


class RunDir:
    def __init__(self, path: str | os.PathLike, config: dict, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.config = config
        self.overwrite = overwrite

    # ------------------------------------------------------------------ set-up
    def prepare(self, is_main: bool = True) -> bool:
        """Create the run directory or check that it holds this same run. Returns True when an
        earlier run with the same configuration exists (a resume)."""
        cfg_file = self.path / "config.yaml"
        if cfg_file.exists():
            try:
                old = yaml.safe_load(cfg_file.read_text()) or {}
            except yaml.YAMLError:
                old = None
            if old is not None and semantic_config(old) == semantic_config(self.config) and not self.overwrite:
                return True
            if not self.overwrite:
                diff = _first_difference(semantic_config(old or {}), semantic_config(self.config))
                raise ConfigError(f"{self.path} holds a different run ({diff}); choose another --out "
                                  "or pass --overwrite to replace it")
            if is_main:  # it is a run directory (it has config.yaml): replace all of it
                shutil.rmtree(self.path)
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_file, yaml.safe_dump(self.config, sort_keys=False))
        return False

    # ------------------------------------------------------------------ records
    def part_file(self, rank: int) -> Path:
        return self.path / f"records.part-{rank}.jsonl"

    def load_records(self) -> dict[int, dict]:
        """Every finished record, from the final file and any part files (index → record).
        A torn last line from a kill is ignored: that image is simply redone."""
        out: dict[int, dict] = {}
        files = [self.path / "records.jsonl"] + sorted(self.path.glob("records.part-*.jsonl"))
        for f in files:
            if not f.exists():
                continue
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    out[int(rec["index"])] = rec
                except (ValueError, KeyError, TypeError):
                    continue
        return out

    def append_records(self, rank: int, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if not lines:
            return
        with open(self.part_file(rank), "a") as fh:
            # a previous kill may have left a partial line: start ours on a fresh one
            if fh.tell() > 0:
                with open(self.part_file(rank), "rb") as check:
                    check.seek(-1, os.SEEK_END)
                    if check.read(1) != b"\n":
                        fh.write("\n")
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def finalize(self, records: dict[int, dict], metrics: dict[str, Any]) -> None:
        """Write records.jsonl and metrics.json atomically, then drop the part files."""
        body = "".join(json.dumps(records[i]) + "\n" for i in sorted(records))
        atomic_write_text(self.path / "records.jsonl", body)
        atomic_write_text(self.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        for f in self.path.glob("records.part-*.jsonl"):
            f.unlink()

    def metrics(self) -> Optional[dict]:
        f = self.path / "metrics.json"
        return json.loads(f.read_text()) if f.exists() else None

    def write_json(self, name: str, payload: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(payload, indent=2) + "\n")


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    return f"{where or 'config'}: {a!r} there, {b!r} now"
