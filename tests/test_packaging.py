"""Packaging (issue 12 §6): the paper protocols ship inside the package and are found by name
outside a checkout; the wheel carries them, py.typed and the license; the run-directory and
demo-build locks are filelock's platform lock with every guarantee the fcntl version had."""
from __future__ import annotations

import email
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import filelock
import pytest
import yaml

import robustprompt
from robustprompt.cli import main
from robustprompt.engine.experiment import PACKAGED_CONFIGS, find_config, load_experiment, packaged_configs
from robustprompt.engine.rundir import LOCK, DirLock
from robustprompt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SRC_CONFIGS = ROOT / "src" / "robustprompt" / "configs"
# the protocols the README names, listed by hand: a YAML that fails to ship is caught here
SHIPPED = {"apd/few_shot", "atpt/test_time", "cba_fapt/base_to_new", "cba_fapt/cross_dataset", "cba_fapt/few_shot",
           "cba_fapt/zero_shot"}


# ---------------------------------------------------------------------------- config lookup
def test_the_packaged_protocols_are_listed_by_name():
    assert set(packaged_configs()) == SHIPPED
    assert PACKAGED_CONFIGS == Path(robustprompt.__file__).resolve().parent / "configs"


@pytest.mark.parametrize("name", ["cba_fapt/few_shot", "cba_fapt/few_shot.yaml", "configs/cba_fapt/few_shot.yaml",
                                  "./configs/cba_fapt/few_shot.yaml"])
def test_a_packaged_config_is_found_by_name_outside_the_checkout(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no configs/ here
    found = find_config(name)
    assert found.read_bytes() == (SRC_CONFIGS / "cba_fapt" / "few_shot.yaml").read_bytes()
    cfg = load_experiment(name)
    raw = yaml.safe_load((SRC_CONFIGS / "cba_fapt" / "few_shot.yaml").read_text())
    assert cfg.name == raw["name"]


def test_a_path_that_exists_wins_over_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "cba_fapt" / "few_shot.yaml"
    mine.parent.mkdir()
    mine.write_text("name: mine\n")
    assert find_config("cba_fapt/few_shot.yaml") == Path("cba_fapt/few_shot.yaml")
    assert find_config(str(mine)) == mine


def test_the_root_configs_folder_still_works_in_a_checkout():
    assert find_config(ROOT / "configs" / "apd" / "few_shot.yaml").resolve() == \
        (SRC_CONFIGS / "apd" / "few_shot.yaml").resolve()


def test_an_unknown_config_name_is_one_line_with_the_nearest_and_the_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"does not exist.*named cba_fapt/fewshot; did you mean cba_fapt/few_shot\?"
                                          r".*shipped: apd/few_shot, atpt/test_time, cba_fapt/base_to_new") as err:
        find_config("cba_fapt/fewshot")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no config shipped with robustprompt is named ../secrets"):
        find_config("../secrets.yaml")   # never looked up outside the package's configs/


def test_run_with_an_unknown_config_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "cba_fapt/few_shoot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean cba_fapt/few_shot?" in err[0]


# ---------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this checkout, as `pip wheel` builds it (no network, no isolation)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment")
    from importlib.metadata import version

    if int(version("setuptools").split(".")[0]) < 77:   # the SPDX license field needs 77 (PEP 639)
        pytest.skip("building the wheel without isolation needs setuptools>=77 here")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("robustprompt-*.whl"))


def test_the_wheel_carries_configs_py_typed_and_the_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"robustprompt/configs/{n}.yaml" for n in SHIPPED} <= names
    assert {"robustprompt/py.typed", "robustprompt/models/configs/rp-tiny.json"} <= names
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{info}/licenses/LICENSE" in names
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{info}/METADATA"))
    assert meta["License-Expression"] == "MIT"
    requires = {r.split(";")[0].split(">")[0].split("=")[0].strip().lower() for r in meta.get_all("Requires-Dist")}
    assert {"numpy", "pillow", "huggingface_hub", "filelock", "torch", "tensorboard", "submitit"} <= requires
    assert set(meta.get_all("Provides-Extra")) >= {"test", "tensorboard", "submitit"}
    license_text = zipfile.ZipFile(wheel).read(f"{info}/licenses/LICENSE").decode()
    assert "MIT License" in license_text and "2026 robustprompt contributors" in license_text


def test_the_installed_wheel_finds_a_protocol_outside_the_checkout(wheel, tmp_path):
    """Unpacked into a folder of its own and run from another: the YAML comes from the wheel."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    code = textwrap.dedent("""
        import robustprompt
        from robustprompt.engine.experiment import find_config
        print(robustprompt.__file__)
        print(find_config("cba_fapt/few_shot").resolve())
    """)
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n{code}"],
                         cwd=work, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    module, found = out.stdout.split()
    assert Path(module).is_relative_to(site)
    assert Path(found) == (site / "robustprompt" / "configs" / "cba_fapt" / "few_shot.yaml").resolve()


# ---------------------------------------------------------------------------- locks
HOLDER = """
import sys, time
from pathlib import Path
from robustprompt.engine.rundir import DirLock
lock = DirLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""

BUILDER = """
import sys, time
from pathlib import Path
from robustprompt.demo.backbone import _build_lock
with _build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(script: str, path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_the_locks_do_not_use_fcntl():
    """fcntl does not exist on Windows: both locks go through filelock's platform lock."""
    for module in ("engine/rundir.py", "demo/backbone.py"):
        source = (ROOT / "src" / "robustprompt" / module).read_text()
        assert "import fcntl" not in source and "filelock.FileLock" in source


def test_a_held_directory_is_refused_naming_the_holder_and_freed_by_kill_9(tmp_path):
    proc = _hold(HOLDER, tmp_path, 120)
    try:
        for _ in range(2):   # a refused contender does not erase the holder's line
            with pytest.raises(ConfigError, match=rf"in use by another robustprompt process \(PID {proc.pid}, since "):
                DirLock(tmp_path).acquire()
        # the same OS lock as filelock's own: other tools that use filelock see it held
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(tmp_path / LOCK).acquire(timeout=0.1)
    finally:
        proc.kill()   # SIGKILL: no finally block runs in the holder; the OS drops its lock
        proc.wait()
    assert (tmp_path / LOCK).exists()   # the killed holder could not tidy up ...
    lock = DirLock(tmp_path)
    lock.acquire()                      # ... yet nothing blocks
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK).read_text()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_wait_waits_for_the_holder_to_finish(tmp_path, capsys):
    proc = _hold(HOLDER, tmp_path, 1.5)
    start = time.monotonic()
    lock = DirLock(tmp_path)
    try:
        lock.acquire(wait=True)
        waited = time.monotonic() - start
    finally:
        lock.release()
        proc.wait()
    assert proc.returncode == 0 and waited > 0.5
    assert f"waiting for PID {proc.pid}" in capsys.readouterr().err


def test_the_demo_build_lock_is_exclusive_and_freed_by_kill_9(tmp_path):
    proc = _hold(BUILDER, tmp_path, 120)
    try:
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(tmp_path / ".lock").acquire(timeout=0.1)
    finally:
        proc.kill()
        proc.wait()
    from robustprompt.demo.backbone import _build_lock

    start = time.monotonic()
    with _build_lock(tmp_path):
        pass
    assert time.monotonic() - start < 5
