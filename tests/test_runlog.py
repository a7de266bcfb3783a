"""Run logs a user reads later: log.txt, scalars.csv, --report-to, and progress bars in a cluster log."""
import csv
import io
import logging
import sys

import pytest

from robustprompt.engine import runlog
from robustprompt.engine.runlog import (parse_report_to, progress_bar, require_reporters, run_logging,
                                        tee_to_log)
from robustprompt.errors import ConfigError

log = logging.getLogger("robustprompt")


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------ progress bars
def test_non_tty_bar_prints_plain_lines_no_carriage_returns():
    stream = io.StringIO()   # not a terminal: isatty() is False
    bar = progress_bar(5, "eval x", "img", stream=stream, interval=0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first draw (0/5), one per update (1/5 … 5/5); the closing redraw repeats 5/5 and is dropped
    assert len(lines) == 6, lines
    assert lines[0].startswith("eval x:") and "0/5" in lines[0] and "5/5" in lines[-1]


def test_non_tty_bar_prints_at_most_one_line_per_interval():
    stream = io.StringIO()
    bar = progress_bar(2000, "train", "step", stream=stream, interval=30)
    for _ in range(2000):   # all within far less than 30 s
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert 1 <= len(lines) <= 3, lines   # the first draw and the final state, not 2000 redraws
    assert "2000/2000" in lines[-1]


def test_disabled_bar_prints_nothing():
    stream = io.StringIO()
    bar = progress_bar(3, "x", "img", stream=stream, disable=True)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == ""


# ------------------------------------------------------------------ log.txt and scalars.csv
def test_log_txt_gets_records_while_open_and_a_header_per_start(tmp_path):
    log.setLevel(logging.INFO)
    log.info("before the run")   # not part of the run: not in its log
    with run_logging(tmp_path, "eval"):
        log.info("first start message")
    log.info("between runs")
    with run_logging(tmp_path, "eval"):
        log.warning("second start message")
    with tee_to_log(tmp_path / "log.txt"):
        print("clean 91.0 %  robust 12.5 %")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("==== robustprompt eval started")]
    assert headers == [0, 2]
    assert lines[1].endswith("INFO first start message")
    assert lines[3].endswith("WARNING second start message")
    assert lines[4] == "clean 91.0 %  robust 12.5 %"
    assert not any("before the run" in line or "between runs" in line for line in lines)


def test_scalars_csv_is_appended_with_one_header(tmp_path):
    with run_logging(tmp_path, "train") as s:
        s.add("train/loss", 2.5, 1)
        s.add_many({"loss": 1.25, "clean_acc": 50, "flag": True, "name": "x"}, 1, prefix="epoch/")
    with run_logging(tmp_path, "train") as s:   # a resume appends
        s.add("train/loss", 0.5, 2)
    rows = _rows(tmp_path / "scalars.csv")
    assert rows[0] == ["wall_time", "step", "tag", "value"]
    body = [(r[1], r[2], float(r[3])) for r in rows[1:]]
    assert body == [("1", "train/loss", 2.5), ("1", "epoch/loss", 1.25), ("1", "epoch/clean_acc", 50.0),
                    ("2", "train/loss", 0.5)]


def test_other_processes_write_nothing(tmp_path):
    with run_logging(tmp_path, "eval", main_process=False) as s:
        log.info("from process 2")
        s.add("eval/images_done", 3, 3)
    assert list(tmp_path.iterdir()) == []


def test_active_is_the_open_run_only(tmp_path):
    assert runlog.active() is None
    with run_logging(tmp_path, "eval") as s:
        assert runlog.active() is s
    assert runlog.active() is None


# ------------------------------------------------------------------ --report-to
@pytest.mark.parametrize("value, expected", [(None, ()), ("none", ()), ("tensorboard", ("tensorboard",)),
                                             ("TensorBoard, none", ("tensorboard",))])
def test_report_to_values(value, expected):
    assert parse_report_to(value) == expected


@pytest.mark.parametrize("value, words", [("wandb", "not supported yet"), ("mlflow", "unknown reporter")])
def test_report_to_bad_values_are_one_line(value, words):
    with pytest.raises(ConfigError, match=words):
        parse_report_to(value)


def test_missing_tensorboard_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        require_reporters("tensorboard")


def test_report_to_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with run_logging(tmp_path, "train", report_to=("tensorboard",)) as s:
        s.add("train/loss", 1.5, 1)
        s.add("train/loss", 0.25, 2)
    assert any(p.name.startswith("events.out.tfevents.") for p in (tmp_path / "tensorboard").iterdir())
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.5), (2, 0.25)]


# ------------------------------------------------------------------ a real run
def test_train_run_writes_log_and_per_step_scalars(tmp_path, capsys):
    from robustprompt.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", "demo", "--method", "coop", "--dataset", "fashion_mnist", "--shots", "2",
            "--batch-size", "10", "--epochs", "2", "--n-ctx", "4", "--lr", "0.01", "--augment", "none", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    rows = _rows(out / "scalars.csv")[1:]
    steps = [int(r[1]) for r in rows if r[2] == "train/loss"]
    assert steps == [1, 2, 3, 4]   # 20 images, batches of 10, 2 epochs
    assert [int(r[1]) for r in rows if r[2] == "epoch/loss"] == [1, 2]
    # one warm-up epoch at a constant 1e-5 (CoOp's schedule), then the base rate
    assert [float(r[3]) for r in rows if r[2] == "train/lr"] == pytest.approx([1e-5, 1e-5, 0.01, 0.01])
    printed = capsys.readouterr().out.strip().splitlines()
    text = (out / "log.txt").read_text()
    assert text.startswith("==== robustprompt train started")
    summary = [line for line in printed if not line.startswith("run directory")]
    assert summary and all(line in text for line in summary)   # the summary lines are in the log too
    assert main(args) == 0   # the finished run again: a second header, nothing recomputed
    assert (out / "log.txt").read_text().count("==== robustprompt train started") == 2


def test_eval_run_logs_progress_scalars(tmp_path):
    import json

    from robustprompt.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", "demo", "--dataset", "fashion_mnist", "--subset", "8", "--batch-size", "4",
                 "--attack", "pgd", "--steps", "2", "--eps", "1", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    rows = _rows(out / "scalars.csv")[1:]
    assert [int(r[1]) for r in rows if r[2] == "eval/images_done"] == [4, 8]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    robust = 100.0 * sum(r["adv_pred"] == r["label"] for r in records) / len(records)
    clean = 100.0 * sum(r["clean_pred"] == r["label"] for r in records) / len(records)
    last = {r[2]: float(r[3]) for r in rows if r[1] == "8"}
    assert last["eval/robust_acc_so_far"] == pytest.approx(robust)
    assert last["eval/clean_acc_so_far"] == pytest.approx(clean)
    assert (out / "log.txt").read_text().startswith("==== robustprompt eval started")


@pytest.mark.parametrize("value, words", [("wandb", "not supported yet"), ("nope", "unknown reporter")])
def test_cli_bad_report_to_is_one_line_before_any_work(tmp_path, capsys, value, words):
    from robustprompt.cli import main

    out = tmp_path / "run"
    assert main(["eval", "--model", "demo", "--dataset", "fashion_mnist", "--subset", "4", "--device", "cpu",
                 "--no-progress", "--report-to", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustprompt eval: error: --report-to") and words in err[0]
    assert not out.exists()


def test_overwrite_replaces_the_logs_and_events(tmp_path):
    pytest.importorskip("tensorboard")
    from robustprompt.cli import main

    out = tmp_path / "eval"
    args = ["eval", "--model", "demo", "--dataset", "fashion_mnist", "--attack", "none", "--device", "cpu",
            "--no-progress", "--report-to", "tensorboard", "--out", str(out)]
    assert main([*args, "--subset", "4"]) == 0
    first = {p.name for p in (out / "tensorboard").iterdir()}
    assert main([*args, "--subset", "3", "--overwrite"]) == 0   # a different run: our files are replaced
    assert (out / "log.txt").read_text().count("==== robustprompt eval started") == 1
    assert [r[1] for r in _rows(out / "scalars.csv")[1:] if r[2] == "eval/images_done"] == ["3"]
    assert not first & {p.name for p in (out / "tensorboard").iterdir()}
    (out / "tensorboard" / "notes.txt").write_text("mine")   # something we did not write: never deleted
    assert main([*args, "--subset", "2", "--overwrite"]) == 0
    assert (out / "tensorboard" / "notes.txt").read_text() == "mine"
