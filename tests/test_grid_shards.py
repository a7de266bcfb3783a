"""A protocol grid over many processes: `run --shard i/N`, `run --collect`, `run --launcher local|slurm`.

The units are (grid point, seed) pairs; shards take them round-robin; a complete collection equals the
summary of one unsharded run; shards started together on one root both run."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustprompt.cli import main
from robustprompt.config import from_dict, to_dict
from robustprompt.engine.experiment import ExperimentConfig, collect_experiment, run_experiment
from robustprompt.engine.grid import (INCOMPLETE_EXIT, LauncherConfig, claim_root_briefly, grid_units,
                                      parse_shard, shard_units)
from robustprompt.errors import ConfigError

# the cheapest training grid of tests/test_experiment.py, cut to 2 points × 1 seed, PGD-1
TRAIN = {
    "name": "g",
    "train": {"model": {"name": "demo", "prompt": {"depth": 2}},
              "data": {"dataset": "fashion_mnist", "shots": 1, "batch_size": 10, "augment": "none"},
              "optim": {"epochs": 1}, "train_attack": {"eps": 4, "alpha": 2, "steps": 1}},
    "eval": {"attack": {"eps": 4, "steps": 1}, "targets": [{"subset": 4, "batch_size": 4}]},
    "seeds": [1],
    "grid": {"train.method.name": ["advvp", "cba_fapt"]},
    "device": "cpu",
    "launcher": {"gpus_per_node": 0, "timeout_min": 10},
}
# the cheapest test-time protocol of tests/test_tta_experiment.py: 2 defences × 1 seed on 2 images
VIEWS = {"n_views": 4, "select_ratio": 0.5, "crop_scale": 0.6}
TTA = {
    "name": "gt",
    "tta": {"model": {"name": "demo"}, "data": {"dataset": "fashion_mnist", "subset": 2, "batch_size": 2},
            "attack": {"eps": 4, "alpha": 1, "steps": 1}},
    "seeds": [0],
    "grid": {"tta.method": [{"name": "tpt", "params": VIEWS}, {"name": "mta", "params": VIEWS}]},
    "device": "cpu",
}


def _same_up_to_root(a: dict, root_a: Path, b: dict, root_b: Path) -> None:
    """Two summaries are equal once each run path is read relative to its own root."""
    def relative(summary: dict, root: Path) -> dict:
        return json.loads(json.dumps(summary).replace(str(root), "ROOT"))

    assert relative(a, root_a) == relative(b, root_b)


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """The training grid run the ordinary way, once for the module: (summary, root)."""
    root = tmp_path_factory.mktemp("unsharded") / "exp"
    return run_experiment(from_dict(ExperimentConfig, TRAIN), root, progress=False), root


# ------------------------------------------------------------------------------ the share of each shard
def test_round_robin_shares_by_hand():
    units = grid_units(["a", "b", "c"], [1, 2])      # a1 a2 b1 b2 c1 c2: points outer, seeds inner
    assert [(u.point, u.seed) for u in units] == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1), ("c", 2)]
    assert [u.index for u in shard_units(units, 1, 4)] == [0, 4]
    assert [u.index for u in shard_units(units, 2, 4)] == [1, 5]
    assert [u.index for u in shard_units(units, 4, 4)] == [3]
    assert [u.index for u in shard_units(units, 3, 6)] == [2]        # N = #units: shard j is unit j
    assert shard_units(units, 7, 9) == []                            # N > #units: some shards are empty


@pytest.mark.parametrize("n_units", [1, 5, 12])
def test_every_unit_is_in_exactly_one_shard_for_any_n(n_units):
    units = grid_units([f"p{i}" for i in range(n_units)], [0])
    for n in range(1, n_units + 4):
        seen = sorted(u.index for i in range(1, n + 1) for u in shard_units(units, i, n))
        assert seen == list(range(n_units))


@pytest.mark.parametrize("text, shard", [("1/1", (1, 1)), ("3/8", (3, 8)), (" 8 / 8 ", (8, 8))])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard


@pytest.mark.parametrize("text, message", [("0/4", "numbered 1 to N"), ("5/4", "numbered 1 to N"),
                                           ("1/0", "numbered 1 to N"), ("2", "I/N"), ("a/b", "I/N"),
                                           ("-1/4", "I/N")])
def test_bad_shards_are_one_line_errors(text, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        parse_shard(text)
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    assert main(["run", str(tmp_path / "e.yaml"), f"--shard={text}", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _array(task, low, high, count, step=None):
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high),
           "SLURM_ARRAY_TASK_COUNT": str(count)}
    return env if step is None else {**env, "SLURM_ARRAY_TASK_STEP": str(step)}


@pytest.mark.parametrize("env, shard", [
    (_array(0, 0, 63, 64), (1, 64)), (_array(63, 0, 63, 64), (64, 64)),     # --array=0-63
    (_array(1, 1, 64, 64), (1, 64)), (_array(64, 1, 64, 64, 1), (64, 64)),  # --array=1-64: the same shares
    (_array(6, 0, 126, 64, 2), (4, 64)),                                   # --array=0-126:2, task 6 is the 4th
    (_array(5, 5, 5, 1), (1, 1)), (_array(6, 3, 9, 3, 3), (2, 3))])        # one task; --array=3-9:3 (3, 6, 9)
def test_shard_slurm_is_the_task_s_place_in_its_array(env, shard):
    assert parse_shard("slurm", env) == shard


def test_every_unit_runs_once_under_a_one_based_array():
    """--array=1-N with --shard slurm deals every unit once (the shell arithmetic $((ID + 1)) would skip share 1
    and refuse share N + 1)."""
    units = grid_units([f"p{k}" for k in range(7)], [1, 2])
    n = 4
    shards = [parse_shard("slurm", _array(task, 1, n, n)) for task in range(1, n + 1)]
    assert sorted(u.index for i, count in shards for u in shard_units(units, i, count)) == list(range(len(units)))


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_ARRAY_TASK_ID is not set"), (_array(0, 0, 3, 4) | {"SLURM_ARRAY_TASK_MAX": ""}, "MAX is not set"),
    (_array(3, 1, 4, 3), "evenly spaced range"),           # --array=1,3,4: a gap
    (_array(3, 0, 6, 4, 2), "evenly spaced range"),        # --array=0-6:2 has no task 3
    (_array(9, 0, 3, 4), "evenly spaced range"),           # a task outside its array
    (_array("x", 0, 3, 4), "not whole numbers")])
def test_shard_slurm_outside_an_evenly_spaced_array_is_one_line(env, message, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=message):
        parse_shard("slurm", env)
    for key in [k for k in os.environ if k.startswith("SLURM_ARRAY_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    assert main(["run", str(tmp_path / "e.yaml"), "--shard", "slurm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, message", [(["--shard", "1/2", "--collect"], "do not go together"),
                                            (["--collect", "--launcher", "local"], "do not go together"),
                                            (["--shards", "3"], "goes with --launcher"),
                                            (["--set", "launcher.gpus=1"], "launcher.gpus"),
                                            (["--set", "launcher.timeout_min=0"], "launcher.timeout_min")])
def test_contradictory_grid_flags_are_refused(flags, message, tmp_path, capsys):
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    assert main(["run", str(tmp_path / "e.yaml"), *flags, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ the shared root
def test_the_root_takes_one_experiment_but_any_device(tmp_path):
    root = tmp_path / "exp"
    claim_root_briefly(root, {"name": "a", "seeds": [1], "device": "cuda:0"})
    claim_root_briefly(root, {"name": "a", "seeds": [1], "device": "cuda:1"})     # where a shard runs: free
    assert yaml.safe_load((root / "experiment.yaml").read_text())["device"] == "cuda:0"   # first one kept
    with pytest.raises(ConfigError, match="another experiment"):
        claim_root_briefly(root, {"name": "a", "seeds": [2], "device": "cuda:0"})
    assert not (root / ".robustprompt.lock").exists()                              # the lock was let go


def test_an_unsharded_run_refuses_a_root_of_another_experiment(tmp_path):
    """A root holds one experiment whichever way it is run: an unsharded run of another config no longer
    rewrites experiment.yaml (which --collect trusts to say what the runs in the root are)."""
    root = tmp_path / "exp"
    claim_root_briefly(root, to_dict(from_dict(ExperimentConfig, TRAIN)))      # what a shard of TRAIN wrote
    before = (root / "experiment.yaml").read_text()
    other = {**TRAIN, "eval": {**TRAIN["eval"], "attack": {"eps": 4, "steps": 10}}}
    with pytest.raises(ConfigError, match="holds another experiment .*eval"):
        run_experiment(from_dict(ExperimentConfig, other), root, progress=False)
    assert (root / "experiment.yaml").read_text() == before
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["experiment.yaml"]


def test_an_experiment_file_without_later_defaults_is_the_same_experiment(tmp_path):
    """experiment.yaml written before a key existed (here: launcher, eval.attack.precision) compares equal to
    the same config read today, with the defaults filled in."""
    root = tmp_path / "exp"
    full = to_dict(from_dict(ExperimentConfig, TRAIN))
    old = {k: v for k, v in full.items() if k != "launcher"}
    old["eval"] = {**old["eval"], "attack": {k: v for k, v in old["eval"]["attack"].items() if k != "precision"}}
    claim_root_briefly(root, old)
    claim_root_briefly(root, full)                     # accepted: nothing but defaults differs
    with pytest.raises(ConfigError, match="another experiment"):
        claim_root_briefly(root, {**full, "seeds": [2]})


def test_a_root_held_by_an_unsharded_run_is_refused_after_the_patience(tmp_path):
    from robustprompt.engine.rundir import experiment_dir

    root = tmp_path / "exp"
    with experiment_dir(root):   # what an unsharded `run` holds for its whole length
        with pytest.raises(ConfigError, match="in use by another robustprompt process"):
            claim_root_briefly(root, {"name": "a"}, patience_s=0.3)
    claim_root_briefly(root, {"name": "a"}, patience_s=0.3)   # once it has finished: at once


def test_collect_before_anything_ran_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no experiment yet"):
        collect_experiment(from_dict(ExperimentConfig, TRAIN), tmp_path / "nothing")


def test_two_shards_started_together_both_run_and_collect_equals_unsharded(tmp_path, unsharded):
    """Two processes, --shard 1/2 and 2/2, started at the same moment on one root: both finish (neither is
    refused on the root's lock), each its own unit; --collect then gives the unsharded summary."""
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    root = tmp_path / "exp"
    cmd = [sys.executable, "-m", "robustprompt", "run", str(tmp_path / "e.yaml"), "--out", str(root), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "shard 1/2: 1 of 2 units finished" in outs[0][1] and "shard 2/2: 1 of 2 units finished" in outs[1][1]
    assert not (root / "summary.json").exists()                       # shards write no summary
    for point in ("method=advvp", "method=cba_fapt"):
        assert (root / point / "seed-1" / "eval-fashion_mnist" / "metrics.json").is_file()
    assert main(["run", str(tmp_path / "e.yaml"), "--out", str(root), "--collect"]) == 0
    collected = json.loads((root / "summary.json").read_text())
    summary, unsharded_root = unsharded
    _same_up_to_root(collected, root, summary, unsharded_root)
    assert (root / "summary.md").read_text() == (unsharded_root / "summary.md").read_text()
    again = run_experiment(from_dict(ExperimentConfig, TRAIN), root, progress=False)   # unsharded, same root:
    assert json.loads(json.dumps(again)) == collected                                    # reuses every run
    for g in collected["aggregate"]:   # and the numbers are the runs' own
        robust = [json.loads((Path(r) / "metrics.json").read_text())["robust_acc"] for r in g["runs"]]
        assert g["robust_mean"] == pytest.approx(statistics.fmean(robust))


def test_collect_lists_missing_tta_units_until_their_command_runs(tmp_path, capsys):
    """A test-time protocol: one shard of two → --collect exits 3 and names the missing unit with its
    command; running that command completes the grid, and the collection equals an unsharded run."""
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TTA))
    root = tmp_path / "exp"
    base = ["run", str(tmp_path / "e.yaml"), "--out", str(root), "--no-progress"]
    assert main(base + ["--shard", "1/2"]) == 0
    capsys.readouterr()
    assert main(base + ["--collect"]) == INCOMPLETE_EXIT
    out, err = capsys.readouterr()
    assert "incomplete: 1 unit(s)" in err and len(err.strip().splitlines()) == 1
    summary = json.loads((root / "summary.json").read_text())
    [missing] = summary["missing"]
    assert (missing["point"], missing["seed"], missing["unit"]) == ("method=mta", 0, 2)
    assert missing["command"].endswith("--shard 2/2") and "Incomplete: 1 of 2 units" in out
    assert [g["point"] for g in summary["aggregate"]] == ["method=tpt"]
    words = missing["command"].split()
    assert main(words[1:] + ["--no-progress"]) == 0                   # the listed command, as given
    assert main(base + ["--collect"]) == 0
    collected = json.loads((root / "summary.json").read_text())
    assert "missing" not in collected
    reference = run_experiment(from_dict(ExperimentConfig, TTA), tmp_path / "ref", progress=False)
    for r in collected["rows"] + reference["rows"]:
        r.pop("wall_time_s")   # the only field two runs of the same units do not share
    _same_up_to_root(collected, root, reference, tmp_path / "ref")


# ------------------------------------------------------------------------------ submitit
def test_local_launcher_runs_its_jobs_then_collects(tmp_path, unsharded, capsys):
    pytest.importorskip("submitit")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    root = tmp_path / "exp"
    rc = main(["run", str(tmp_path / "e.yaml"), "--out", str(root), "--launcher", "local", "--shards", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "submitted 2 job(s)" in err
    logs = [p for p in (root / "launcher").iterdir() if p.is_dir() and p.name != "%j"]   # %j: the array's pickles
    assert len(logs) == 2 and all(list(p.glob("*.out")) for p in logs)                  # one log folder per job
    summary, unsharded_root = unsharded
    _same_up_to_root(json.loads((root / "summary.json").read_text()), root, summary, unsharded_root)


@pytest.mark.parametrize("gpus_per_node, jobs, device_count, groups", [
    (1, None, 4, [(0,), (1,), (2,), (3,)]), (2, None, 5, [(0, 1), (2, 3)]), (1, 2, 4, [(0,), (1,)]),
    (0, None, 4, [()]), (1, None, 0, [()]), (0, 3, 0, [(), (), ()])])
def test_local_jobs_never_share_a_gpu(gpus_per_node, jobs, device_count, groups):
    from robustprompt.engine.launcher import local_gpu_groups

    assert local_gpu_groups(gpus_per_node, jobs, device_count) == groups


@pytest.mark.parametrize("gpus_per_node, jobs, device_count, message", [
    (1, 5, 4, "GPUs for 4"), (3, None, 2, "asks for 3 GPUs")])
def test_local_jobs_beyond_the_gpus_are_refused(gpus_per_node, jobs, device_count, message):
    from robustprompt.engine.launcher import local_gpu_groups

    with pytest.raises(ConfigError, match=message):
        local_gpu_groups(gpus_per_node, jobs, device_count)


def test_local_jobs_are_submitted_each_with_its_own_gpus(tmp_path, monkeypatch):
    """On a 4-GPU machine, 1 GPU per job: 4 jobs (round-robin shards 1..4 of 4), CUDA_VISIBLE_DEVICES 0, 1, 2,
    3 — not every job on GPU 0 (submitit's default)."""
    pytest.importorskip("submitit")
    from robustprompt.engine import launcher

    submitted = []

    class Recorder:
        params: dict = {}

        def update_parameters(self, **kw):
            self.params = {**self.params, **kw}

        def submit(self, job):
            submitted.append((job.shard, job.count, tuple(self.params["visible_gpus"])))
            return job

    monkeypatch.setattr(launcher, "_executor", lambda *a, **k: Recorder())
    raw = {**TRAIN, "seeds": [1, 2, 3], "launcher": {"gpus_per_node": 1}}
    launcher.submit_grid(from_dict(ExperimentConfig, raw), "local", tmp_path / "exp", device_count=4)
    assert submitted == [(1, 4, (0,)), (2, 4, (1,)), (3, 4, (2,)), (4, 4, (3,))]


def test_local_launcher_on_several_nodes_is_one_line(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    assert main(["run", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "x"), "--launcher", "local",
                 "--set", "launcher.nodes=2"]) == 2
    err = capsys.readouterr().err
    assert "launcher.nodes must be 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_job_with_two_tasks_runs_its_unit_on_two_processes(tmp_path):
    """tasks_per_node = 2: both tasks join one torch.distributed group (gloo on a CPU), as G GPUs would."""
    pytest.importorskip("submitit")
    from robustprompt.engine.launcher import submit_grid

    raw = {**TRAIN, "grid": {"train.method.name": ["advvp"]},
           "launcher": {"gpus_per_node": 0, "tasks_per_node": 2, "timeout_min": 10}}
    [job] = submit_grid(from_dict(ExperimentConfig, raw), "local", tmp_path / "exp")
    assert job.results() == ["shard 1/1 done on 2 process(es)"] * 2
    assert (tmp_path / "exp" / "method=advvp" / "seed-1" / "eval-fashion_mnist" / "metrics.json").is_file()


def test_slurm_jobs_ask_for_the_launcher_section(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from robustprompt.engine.launcher import ShardJob, _executor

    with pytest.raises(ConfigError, match="no Slurm here"):
        monkeypatch.setenv("PATH", str(tmp_path))
        _executor("slurm", tmp_path / "%j", LauncherConfig(), "x")
    (tmp_path / "srun").write_text("#!/bin/sh\n")      # submitit only looks for srun on PATH
    (tmp_path / "srun").chmod(0o755)

    launcher = LauncherConfig(gpus_per_node=2, tasks_per_node=2, cpus_per_task=6, timeout_min=90,
                              partition="gpu", mem_gb=64, array_parallelism=16, additional={"gres": "gpu:a100:2"})
    ex = _executor("slurm", tmp_path / "%j", launcher, "robustprompt-x")
    script = ex._executor._make_submission_file_text("python job.py", "uid")
    for line in ("--partition=gpu", "--cpus-per-task=6", "--time=90", "--gpus-per-node=2", "--ntasks-per-node=2",
                 "--mem=64GB", "--gres=gpu:a100:2", "--job-name=robustprompt-x"):
        assert f"#SBATCH {line}" in script, line
    job = ShardJob({"name": "x"}, "e.yaml", str(tmp_path), 2, 5)
    again = job.checkpoint()            # a preempted job is requeued as itself: its runs resume
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is job


def test_a_missing_submitit_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)   # import submitit now raises ImportError
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    assert main(["run", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "x"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "robustprompt[slurm]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_slurm_without_slurm_is_one_line_and_touches_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))     # no srun anywhere
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(TRAIN))
    assert main(["run", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "x"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "no Slurm here" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
