"""Bad inputs end in one line (issue 10, §5-§7, §9).

Each row of CASES is one user mistake from the reliability review: the argv given to
``robustprompt.cli.main`` (run in-process), the substring its one-line error must hold, and the
exit code. For every row the harness also checks that stderr is exactly one line without a
traceback, that no metrics.json was written, and that a finished run directory made beforehand
(and its image folder) is byte-for-byte unchanged afterwards.

To add a case, append a ``Case`` to CASES (or to a list concatenated onto it). Placeholders in
``argv`` are filled with ``str.format``: {tmp} this case's own empty folder, {run} the finished
eval run, {folder} its image folder (4 RGB images of 2 classes), {eval} a cheap eval prefix
("eval --model rp-tiny --dataset imagefolder:{folder} --attack none --no-progress --out {tmp}/out").
``setup(tmp)`` writes the case's input files; ``patch(monkeypatch, tmp)`` simulates the
environment (a full disk). Rows whose expected result is a success use ``rc=0`` and ``expect``
is then looked for on stdout.
"""
from __future__ import annotations

import errno
import math
import os
import shlex
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

from robustprompt.cli import main

EVAL = "eval --model rp-tiny --dataset imagefolder:{folder} --attack none --no-progress --out {tmp}/out"
EVAL_PGD = "eval --model rp-tiny --dataset imagefolder:{folder} --steps 1 --no-progress --out {tmp}/out"
TTA = ("tta --model rp-tiny --dataset imagefolder:{folder} --method tpt --attack none --param n_views=4 "
       "--param steps=1 --no-progress --out {tmp}/out")
TRAIN = ("train --model rp-tiny --dataset imagefolder:{folder} --method coop --shots 1 --epochs 1 "
         "--no-progress --out {tmp}/out")
EXPLAIN = "explain --model rp-tiny --dataset imagefolder:{folder} --steps 1"


# ----------------------------------------------------------------------------- file makers
def png_bytes(array: np.ndarray, *, size: Optional[tuple[int, int]] = None) -> bytes:
    """A PNG written by hand (so the test does not trust Pillow's encoder): ``array`` H×W (grey)
    or H×W×3 (RGB), uint8 or uint16 (stored big-endian, as PNG requires). ``size`` (w, h) lies
    in the header instead of the array's size (a decompression bomb's header)."""
    h, w = array.shape[:2]
    color = 0 if array.ndim == 2 else 2
    depth = 16 if array.dtype == np.uint16 else 8
    rows = array.astype(">u2" if depth == 16 else "u1")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    w, h = size or (w, h)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _setups(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for fn in fns:
            fn(tmp)
    return setup


def billion_laughs(levels: int) -> str:
    """The classic alias bomb as one config value, attack.eps: level 0 is 9 scalars, level i is 9
    aliases of level i-1 (about 400 bytes for 9 levels)."""
    items = ['&l0 [' + ",".join(["lol"] * 9) + "]"]
    items += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "attack:\n  eps: [" + ", ".join(items) + "]\n"


def laughs_nodes(levels: int) -> int:
    """Nodes of billion_laughs(levels) with every alias expanded, counted by hand: root mapping,
    "attack", its mapping, "eps", the outer sequence, and the level trees (level 0 is a sequence
    of 9 scalars: 10 nodes; level i is a sequence of 9 level-(i-1) trees)."""
    sizes = [10]
    for _ in range(levels - 1):
        sizes.append(1 + 9 * sizes[-1])
    return 5 + sum(sizes)


def _bomb_png(tmp: Path) -> None:
    """A tiny PNG declaring 20000×20000 pixels: over twice Pillow's decompression-bomb limit."""
    (tmp / "bomb.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8), size=(20000, 20000)))


def _truncated_png(tmp: Path) -> None:
    data = png_bytes(np.full((32, 32, 3), 7, np.uint8))
    (tmp / "trunc.png").write_bytes(data[:60])


def _folder_with(name: str, data: bytes) -> Callable[[Path], None]:
    """An image folder of two classes with one odd file in it."""
    def setup(tmp: Path) -> None:
        for c in ("a", "b"):
            (tmp / "f" / c).mkdir(parents=True)
            Image.new("RGB", (20, 20), (40, 90, 200) if c == "a" else (200, 90, 40)).save(tmp / "f" / c / "0.png")
        (tmp / "f" / "a" / name).write_bytes(data)
    return setup


def _tiff(mode: str, values: np.ndarray, **tags: int) -> bytes:
    import io

    img = Image.frombytes(mode, (values.shape[1], values.shape[0]), values.tobytes())
    buf = io.BytesIO()
    img.save(buf, "TIFF", **({"tiffinfo": {int(k[1:]): v for k, v in tags.items()}} if tags else {}))
    return buf.getvalue()


def _full_disk(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The disk fills: every fsync fails with ENOSPC (every result file is fsynced before it
    replaces the old one)."""
    def full(fd):  # noqa: ARG001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def _evil_torchscript(tmp: Path) -> None:
    """A TorchScript archive whose __setstate__ (run by torch.jit.load) would create {tmp}/pwned."""
    import torch
    from test_load_safety import _Evil

    torch.jit.script(_Evil(str(tmp / "pwned"), torch.ones(2, 2))).save(str(tmp / "evil.pt"))


class _WritesMarker:
    """A pickle whose __reduce__ would create a marker file when unpickled with code allowed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_pickle(tmp: Path) -> None:
    import torch

    torch.save({"visual.proj": _WritesMarker(str(tmp / "pwned"))}, str(tmp / "evil.pt"))


_TINY_RUN_CONFIG = ("kind: train\nseed: 0\nmethod: {name: coop}\ndata: {shots: 1}\n"
                    "model: {name: rp-tiny, prompt: {coupling: independent, n_ctx: 2, depth: 1}}\n")


def _foreign_folder(tmp: Path) -> None:
    """A user's folder that happens to hold a config.yaml (a repository root, say)."""
    (tmp / "repo").mkdir()
    (tmp / "repo" / "config.yaml").write_text("project: my-paper\nlr: 0.1\n")
    (tmp / "repo" / "important.txt").write_text("the user's work\n")


_HELD_LOCKS: list = []


def _locked_out(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:  # noqa: ARG001
    """Another robustprompt process holds {tmp}/out (a second flock on the lock file conflicts
    even within one process: flock locks belong to the open file)."""
    from robustprompt.engine.rundir import DirLock

    (tmp / "out").mkdir()
    lock = DirLock(tmp / "out")
    lock.acquire()
    _HELD_LOCKS.append(lock)


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    argv: str                                   # for main(); placeholders: see the module docstring
    expect: str                                 # substring of the error line (stdout when rc == 0)
    rc: int = 2
    setup: Optional[Callable[[Path], None]] = None
    patch: Optional[Callable[[pytest.MonkeyPatch, Path], None]] = None
    seconds: float = 30.0                       # the case must end within this wall time
    marks: tuple = ()
    absent: str = ""                            # a path that must not exist afterwards (an attacker's marker)
    kept: str = ""                              # a path of the user's that must still exist afterwards


CASES: list[Case] = [
    # §5 non-finite and out-of-range knobs
    Case("eval-alpha-nan", EVAL_PGD + " --alpha nan", "attack.alpha: nan is not a finite number"),
    Case("eval-eps-nan", EVAL_PGD + " --eps nan", "attack.eps: nan is not a finite number"),
    Case("eval-eps-inf", EVAL_PGD + " --eps inf", "attack.eps: inf is not a finite number"),
    Case("eval-alpha--inf", EVAL_PGD + " --alpha=-inf", "attack.alpha: -inf is not a finite number"),
    Case("yaml-eps-nan", EVAL_PGD + " --config {tmp}/c.yaml", "attack.eps: nan is not a finite number",
         setup=_write("c.yaml", "attack:\n  eps: .nan\n")),
    Case("yaml-eps-huge-int", EVAL_PGD + " --config {tmp}/c.yaml", "attack.eps: 1111111111111111111… is not a finite number",
         setup=_write("c.yaml", "attack:\n  eps: " + "1" * 400 + "\n")),
    Case("train-lr-nan", TRAIN + " --lr nan", "optim.lr: nan is not a finite number"),
    Case("train-param-nan", TRAIN.replace("coop", "fap") + " --param lam1=.nan",
         "method.params (fap).lam1: nan is not a finite number"),
    Case("train-train-eps-inf", TRAIN + " --train-eps inf", "train_attack.eps: inf is not a finite number"),
    Case("tta-param-lr-nan", TTA + " --param lr=.nan", "method.params (tpt).lr: nan is not a finite number"),
    Case("tta-param-lr-inf", TTA + " --param lr=.inf", "method.params (tpt).lr: inf is not a finite number"),
    Case("explain-eps-nan", EXPLAIN + " --image example --eps nan --out {tmp}/e.png", "eps: nan is not a finite"),
    Case("eval-workers-negative", EVAL + " --workers -1", "data.workers must be >= 0, got -1"),
    Case("train-workers-negative", TRAIN + " --workers -1", "data.workers must be >= 0, got -1"),
    Case("eval-subset-seed-negative", EVAL + " --subset 2 --subset-seed -1", "data.subset_seed must be in [0, 2**31)"),
    Case("eval-subset-seed-huge", EVAL + " --subset 2 --subset-seed 2147483648", "data.subset_seed must be in"),
    Case("explain-subset-seed-negative", EXPLAIN + " --n 1 --subset-seed -1 --out {tmp}/e.png",
         "--subset-seed must be in [0, 2**31)"),
    Case("explain-n-zero", EXPLAIN + " --n 0 --out {tmp}/e.png", "--n must be >= 1"),

    # §7 YAML: data only, bounded
    Case("yaml-billion-laughs", EVAL + " --config {tmp}/c.yaml", "aliases expand to more than 100000 nodes",
         setup=_write("c.yaml", billion_laughs(9)), seconds=5),
    Case("yaml-laughs-quoted-short", EVAL + " --config {tmp}/c.yaml", "attack.eps: expected a number, got [['lol'",
         setup=_write("c.yaml", billion_laughs(5)), seconds=5),
    Case("yaml-recursive-alias", EVAL + " --config {tmp}/c.yaml", "refers to itself",
         setup=_write("c.yaml", "attack: &a\n  eps: [*a]\n"), seconds=5),
    Case("yaml-long-string", EVAL + " --config {tmp}/c.yaml", "data.batch_size: expected an integer, got 'xxx",
         setup=_write("c.yaml", "data:\n  batch_size: " + "x" * 100_000 + "\n")),
    Case("yaml-long-classes", EVAL + " --config {tmp}/c.yaml", "data.classes must be all, base or new, got 'yyy",
         setup=_write("c.yaml", "data:\n  classes: " + "y" * 100_000 + "\n")),
    Case("yaml-python-tag", EVAL + " --config {tmp}/c.yaml", "is not valid YAML",
         setup=_write("c.yaml", "attack: !!python/object/apply:os.system ['touch /tmp/rp-pwned']\n")),
    Case("yaml-int-keys", EVAL + " --config {tmp}/c.yaml", "unknown key(s) 1",
         setup=_write("c.yaml", "1: 2\nattack:\n  eps: 1\n")),
    Case("config-is-a-folder", EVAL + " --config {tmp}", "is a folder, not a YAML file"),
    Case("yaml-not-utf8", EVAL + " --config {tmp}/c.yaml", "is not UTF-8 text",
         setup=_write("c.yaml", b"\xff\xfe\x00\x01attack")),
    Case("yaml-deep-nesting", EVAL + " --config {tmp}/c.yaml", "is not valid YAML",
         setup=_write("c.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n"), seconds=10),
    Case("yaml-method-not-mapping", TRAIN.replace("--method coop ", "") + " --config {tmp}/c.yaml --param lam1=1",
         "method: expected a mapping",
         setup=_write("c.yaml", "method: fap\n")),
    Case("param-alias-bomb", TTA + " --param " + shlex.quote(
        "lr=" + "[" + ",".join(["&a [1,1,1,1,1,1,1,1,1]"] + ["*a"] * 8) + "]"),
        "method.params (tpt).lr: expected a number, got [[1, 1, 1"),
    Case("param-no-equals", TTA + " --param lr", "expected KEY=VALUE, got 'lr'"),

    # §7 images: refused in one line, never decoded when they are bombs
    Case("explain-decompression-bomb", EXPLAIN + " --image {tmp}/bomb.png --out {tmp}/e.png",
         "decompression bomb", setup=_bomb_png, seconds=10),
    Case("explain-missing-image", EXPLAIN + " --image {tmp}/nope.png --out {tmp}/e.png", "image file not found"),
    Case("explain-not-an-image", EXPLAIN + " --image {tmp}/text.png --out {tmp}/e.png", "cannot read image",
         setup=_write("text.png", "hello, not a PNG\n")),
    Case("explain-truncated-image", EXPLAIN + " --image {tmp}/trunc.png --out {tmp}/e.png", "cannot read image",
         setup=_truncated_png),
    Case("eval-folder-with-bomb", EVAL.replace("{folder}", "{tmp}/f"), "decompression bomb",
         setup=_folder_with("1.png", png_bytes(np.zeros((1, 1), np.uint8), size=(20000, 20000)))),
    Case("eval-folder-int32-tiff", EVAL.replace("{folder}", "{tmp}/f"), "32-bit integer pixels",
         setup=_folder_with("1.tif", _tiff("I", np.full((4, 4), 70000, np.int32)))),
    Case("eval-folder-float-tiff-out-of-range", EVAL.replace("{folder}", "{tmp}/f"), "floating-point pixels",
         setup=_folder_with("1.tif", _tiff("F", np.full((4, 4), 300.0, np.float32)))),
    Case("eval-folder-16bit-ok", EVAL.replace("{folder}", "{tmp}/f"), "clean accuracy", rc=0,
         setup=_folder_with("1.png", png_bytes(np.full((8, 8), 40000, np.uint16)))),

    # §7 output places that cannot be written
    Case("report-out-is-file", "report {run} --out {tmp}/file", "--out {tmp}/file is a file, not a folder",
         setup=_write("file", "x")),
    Case("report-out-under-file", "report {run} --out {tmp}/file/sub", "cannot write {tmp}/file/sub",
         setup=_write("file", "x")),
    Case("report-disk-full", "report {run} --out {tmp}/rep", "cannot write {tmp}/rep/results.md: No space left",
         patch=_full_disk),
    Case("explain-out-bad-suffix", EXPLAIN + " --image example --out {tmp}/e.txt", "--out must end in .png or .pdf"),
    Case("explain-out-existing-folder", EXPLAIN + " --image example --out {tmp}", "wrote {tmp}/explain.png, "
         "{tmp}/explain.pdf", rc=0),
    Case("explain-out-under-file", EXPLAIN + " --image example --out {tmp}/file/e.png", "cannot write {tmp}/file",
         setup=_write("file", "x")),

    # §1 checkpoints are data: nothing in them runs
    Case("pretrained-torchscript-setstate", EVAL + " --pretrained {tmp}/evil.pt",
         "cannot read without running its code", setup=_evil_torchscript, absent="pwned"),
    Case("pretrained-pickle-with-code", EVAL + " --pretrained {tmp}/evil.pt",
         "only running code could rebuild", setup=_evil_pickle, absent="pwned"),
    Case("pretrained-empty-file", EVAL + " --pretrained {tmp}/w.pt", "empty file (0 bytes)", setup=_write("w.pt", b"")),
    Case("pretrained-text-file", EVAL + " --pretrained {tmp}/w.pt", "not a PyTorch checkpoint",
         setup=_write("w.pt", "101 not a checkpoint\n")),
    Case("device-bogus", EVAL + " --device bogus", "--device 'bogus' is not a device"),
    Case("run-empty-config", EVAL + " --run {tmp}/r", "config.yaml",
         setup=_setups(_write("r/config.yaml", ""), _write("r/prompts.safetensors", b"garbage"))),
    Case("run-corrupt-prompts", EVAL + " --run {tmp}/r", "cannot read prompts",
         setup=_setups(_write("r/config.yaml", _TINY_RUN_CONFIG), _write("r/prompts.safetensors", b"garbage"))),

    # §2-§4, §7 run directories
    Case("out-is-a-users-folder", EVAL.replace("{tmp}/out", "{tmp}/repo"), "is not a robustprompt run directory",
         setup=_foreign_folder, kept="repo/important.txt"),
    Case("overwrite-a-users-folder", EVAL.replace("{tmp}/out", "{tmp}/repo") + " --overwrite",
         "is not a robustprompt run directory", setup=_foreign_folder, kept="repo/important.txt"),
    Case("out-is-a-file", EVAL.replace("{tmp}/out", "{tmp}/file"), "is an existing file, not a folder",
         setup=_write("file", "x"), kept="file"),
    Case("out-in-use", EVAL, "is in use by another robustprompt process (PID", patch=_locked_out),
    Case("seed-negative", EVAL + " --seed -1", "seed must be an integer from 0 to 2147483647"),
    Case("seed-huge", EVAL + " --seed 9223372036854775808", "seed must be an integer from 0 to 2147483647"),
    Case("tta-defence-seed-huge", TTA + " --defence-seed 4294967296", "seed must be an integer from 0 to"),
    Case("train-seed-negative", TRAIN + " --seed -5", "seed must be an integer from 0 to 2147483647"),

    # CLI surface
    Case("verbose-after-command", "methods -v", "coop", rc=0),
    Case("argparse-error-one-line", EVAL + " --workers lots", "argument --workers: invalid int value"),
    Case("argparse-long-choice", EVAL + " --attack " + "z" * 5000, "invalid choice"),
]


# ----------------------------------------------------------------------------- the harness
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A cheap finished eval run (rp-tiny, 4 images, no attack) and its image folder."""
    base = tmp_path_factory.mktemp("finished")
    folder = base / "folder"
    for c, color in [("red", (200, 30, 30)), ("green", (30, 200, 30))]:
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 36), tuple(v + 10 * i for v in color)).save(folder / c / f"{i}.png")
    run = base / "run"
    assert main(["eval", "--model", "rp-tiny", "--dataset", f"imagefolder:{folder}", "--attack", "none",
                 "--no-progress", "--out", str(run)]) == 0
    assert (run / "metrics.json").is_file()
    return {"run": run, "folder": folder, "snapshot": _snapshot(base), "base": base}


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code or 0)


def _params() -> list:
    return [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, finished, tmp_path, capsys, monkeypatch):
    if case.setup:
        case.setup(tmp_path)
    if case.patch:
        case.patch(monkeypatch, tmp_path)
    places = {"tmp": tmp_path, "run": finished["run"], "folder": finished["folder"]}
    argv = shlex.split(case.argv.replace("{eval}", EVAL).format(**places))
    capsys.readouterr()
    start = time.perf_counter()
    rc = run_cli(argv)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    expect = case.expect.format(**places)
    assert "Traceback" not in err
    assert rc == case.rc, err
    if case.rc == 0:
        assert expect in out
    else:
        lines = err.splitlines()
        assert len(lines) == 1, err[:2000]
        assert lines[0].startswith(f"robustprompt {argv[0]}: error: "), lines[0][:300]
        assert expect in lines[0], lines[0][:2000]
        assert len(lines[0]) <= 1000
        assert not list(tmp_path.rglob("metrics.json"))  # a refused command records no result
    assert elapsed < case.seconds
    assert _snapshot(finished["base"]) == finished["snapshot"]  # the earlier run is untouched
    if case.absent:
        assert not (tmp_path / case.absent).exists()
    if case.kept:
        assert (tmp_path / case.kept).exists()


@pytest.fixture(autouse=True)
def _release_held_locks():
    yield
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().release()


def test_wait_flag_waits_for_the_holder(finished, tmp_path, capsys):
    """--wait: the command waits for the process holding --out, then runs."""
    import threading

    from robustprompt.engine.rundir import DirLock

    (tmp_path / "out").mkdir()
    lock = DirLock(tmp_path / "out")
    lock.acquire()
    threading.Timer(1.0, lock.release).start()
    argv = shlex.split(EVAL.format(tmp=tmp_path, folder=finished["folder"])) + ["--wait"]
    assert run_cli(argv) == 0
    out, err = capsys.readouterr()
    assert "waiting for PID" in err and "clean accuracy" in out


# ----------------------------------------------------------------------------- beyond the table
def test_internal_bug_still_shows_its_traceback(monkeypatch):
    import robustprompt.cli as cli

    def broken(args):  # noqa: ARG001
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "cmd_methods", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["methods"])


def test_an_oserror_that_is_not_the_environment_is_a_bug(monkeypatch):
    import robustprompt.cli as cli

    def broken(args):  # noqa: ARG001
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/internal/cache")

    monkeypatch.setattr(cli, "cmd_methods", broken)
    with pytest.raises(FileNotFoundError):
        main(["methods"])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS])
def test_environment_oserror_is_one_line(monkeypatch, capsys, code):
    import robustprompt.cli as cli

    def failing(args):  # noqa: ARG001
        raise OSError(code, os.strerror(code), "/data/out/metrics.json")

    monkeypatch.setattr(cli, "cmd_methods", failing)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert err == f"robustprompt methods: error: cannot write /data/out/metrics.json: {os.strerror(code)}\n"


def test_verbose_flag_works_in_both_places(capsys):
    import logging

    for argv in (["-v", "methods"], ["methods", "--verbose"]):
        assert main(argv) == 0
        assert logging.getLogger("robustprompt").level == logging.DEBUG
    assert main(["methods"]) == 0
    assert logging.getLogger("robustprompt").level == logging.INFO
    ours = [h for h in logging.getLogger("robustprompt").handlers if type(h).__name__ == "_StderrHandler"]
    assert len(ours) == 1  # main() run again in-process does not stack handlers


# --- §5 finiteness at the config layer (every float field, every path into it)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_rejects_non_finite(value):
    from robustprompt.config import AttackSpec, from_dict
    from robustprompt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"where\.eps: .* is not a finite number"):
        from_dict(AttackSpec, {"eps": value}, "where")
    with pytest.raises(ConfigError, match="alpha"):
        AttackSpec(eps=1.0, alpha=value)  # the Python API path, without from_dict


def test_subset_seed_range_and_workers():
    from robustprompt.config import DataSpec
    from robustprompt.errors import ConfigError

    DataSpec(subset_seed=0), DataSpec(subset_seed=2**31 - 1), DataSpec(workers=0)
    for bad in ({"subset_seed": -1}, {"subset_seed": 2**31}, {"workers": -1}):
        with pytest.raises(ConfigError):
            DataSpec(**bad)


# --- §7 the YAML loader
def test_yaml_loader_refuses_an_alias_bomb_fast(tmp_path):
    from robustprompt.config import load_yaml
    from robustprompt.errors import ConfigError

    text = billion_laughs(9)
    assert len(text) < 450 and laughs_nodes(9) > 4e8
    (tmp_path / "bomb.yaml").write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100000 nodes") as err:
        load_yaml(tmp_path / "bomb.yaml")
    assert time.perf_counter() - start < 2 and len(str(err.value)) < 300


def test_yaml_loader_node_count_is_exact(tmp_path):
    """The loader refuses exactly above the limit, counting aliases expanded (hand count above);
    below it, aliases stay shared objects (the loader makes no copies)."""
    from robustprompt import config
    from robustprompt.errors import ConfigError

    (tmp_path / "c.yaml").write_text(billion_laughs(5))
    expected = laughs_nodes(5)
    assert expected == 74_737
    old = config.MAX_YAML_NODES
    try:
        config.MAX_YAML_NODES = expected
        data = config.load_yaml(tmp_path / "c.yaml")
        config.MAX_YAML_NODES = expected - 1
        with pytest.raises(ConfigError, match=f"aliases expand to more than {expected - 1} nodes"):
            config.load_yaml(tmp_path / "c.yaml")
    finally:
        config.MAX_YAML_NODES = old
    levels = data["attack"]["eps"]
    assert len(levels) == 5 and levels[1][0] is levels[0] and levels[4][8] is levels[3]


# --- §6 16-bit and other wide images
def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    """Hand-computed: an 8-bit value is the 16-bit value's high byte (v >> 8)."""
    from robustprompt.data.images import load_rgb

    values = np.array([[0, 255, 256, 1000], [20000, 32767, 32768, 40000], [50000, 60000, 65279, 65280],
                       [65534, 65535, 12345, 4242]], np.uint16)
    (tmp_path / "g16.png").write_bytes(png_bytes(values))
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # the case convert("RGB") clipped to 255
    img = load_rgb(tmp_path / "g16.png")
    assert img.mode == "RGB" and img.size == (4, 4)
    expected = [[v // 256 for v in row] for row in values.tolist()]
    got = np.asarray(img)
    assert got[..., 0].tolist() == expected and (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    assert got.mean() == pytest.approx(sum(map(sum, expected)) / 16)


def test_16bit_grey_matches_pillows_own_16bit_rgb_decoding(tmp_path):
    """The same 16-bit picture stored as grey and as RGB loads to the same pixels (Pillow reduces
    16-bit RGB itself, by the high byte; the grey path must agree)."""
    from robustprompt.data.images import load_rgb

    g = np.random.default_rng(0).integers(0, 65536, size=(6, 5), dtype=np.uint16)
    (tmp_path / "g.png").write_bytes(png_bytes(g))
    (tmp_path / "c.png").write_bytes(png_bytes(np.repeat(g[..., None], 3, axis=2)))
    assert Image.open(tmp_path / "c.png").mode == "RGB"
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g.png")), np.asarray(load_rgb(tmp_path / "c.png")))


def test_issue_example_mean_pixel(tmp_path):
    """The review's picture: a dark 16-bit gradient. Clipping gave a far brighter image."""
    from robustprompt.data.images import load_rgb

    v = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 5).astype(np.uint16)  # 0 … 20475
    (tmp_path / "d.png").write_bytes(png_bytes(v))
    hand = sum(int(x) >> 8 for x in v.ravel()) / v.size
    assert np.asarray(load_rgb(tmp_path / "d.png")).mean() == pytest.approx(hand)
    clipped = np.minimum(v, 255).mean()
    assert abs(clipped - hand) > 100  # what convert("RGB") used to give


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16bit_tiff_byte_orders(tmp_path, mode, dtype):
    from robustprompt.data.images import load_rgb

    values = np.array([[0, 300, 40000, 65535]], dtype=dtype)
    (tmp_path / "t.tif").write_bytes(_tiff(mode, values))
    assert np.asarray(load_rgb(tmp_path / "t.tif"))[..., 0].tolist() == [[0, 1, 156, 255]]


def test_int32_tiff_with_declared_range_is_scaled(tmp_path):
    """A 32-bit integer image that declares MaxSampleValue 4095 (12-bit data): v·256 // 4096."""
    from robustprompt.data.images import load_rgb

    values = np.array([[0, 16, 2048, 4095]], np.int32)
    (tmp_path / "t.tif").write_bytes(_tiff("I", values, t281=4095))
    assert np.asarray(load_rgb(tmp_path / "t.tif"))[..., 0].tolist() == [[0, 1, 128, 255]]


@pytest.mark.parametrize("values,expected", [
    ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),         # [0, 1] floats: round(v · 255)
    ([0.0, 2.0, 127.6, 255.0], [0, 2, 128, 255]),       # [0, 255] floats: round(v)
])
def test_float_tiff_ranges(tmp_path, values, expected):
    from robustprompt.data.images import load_rgb

    (tmp_path / "t.tif").write_bytes(_tiff("F", np.array([values], np.float32)))
    assert np.asarray(load_rgb(tmp_path / "t.tif"))[..., 0].tolist() == [expected]


@pytest.mark.parametrize("values", [[0.0, -0.5], [0.0, 256.0], [0.0, float("nan")]])
def test_float_tiff_outside_both_ranges_is_refused(tmp_path, values):
    from robustprompt.data.images import load_rgb
    from robustprompt.errors import DatasetError

    (tmp_path / "t.tif").write_bytes(_tiff("F", np.array([values], np.float32)))
    with pytest.raises(DatasetError, match="floating-point pixels"):
        load_rgb(tmp_path / "t.tif")


def test_in_memory_16bit_image_through_the_transform():
    """API users hand PIL images to the transform directly: the same scaling applies there."""
    from robustprompt.data.transforms import ToRGB

    img = Image.frombytes("I;16", (2, 1), np.array([256, 65535], "<u2").tobytes())
    assert np.asarray(ToRGB()(img))[..., 0].tolist() == [[1, 255]]


def test_yaml_is_data_only(tmp_path):
    """A Python tag in a config or a --param value is refused, and nothing runs."""
    from robustprompt.config import parse_yaml
    from robustprompt.errors import ConfigError

    marker = tmp_path / "pwned"
    for text in (f"a: !!python/object/apply:os.system ['touch {marker}']",
                 f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]"):
        with pytest.raises(ConfigError, match="is not valid YAML"):
            parse_yaml(text, "test")
    assert not marker.exists()
