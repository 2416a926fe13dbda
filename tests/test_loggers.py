"""Loggers: logger=[tensorboard,csv,mlflow,wandb] gives every one the same metrics at the same steps; a
run stopped mid-epoch and resumed is one run in each tracker, each step once; each tracker's own client
reads it back (MLflow's MlflowClient over its SQLite store; W&B's offline .wandb files, whose records
are W&B's own protobuf messages)."""

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, refused_in_process, run_trainer, start_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.loggers.metric_log import MetricLog

ARGS = [
    "dataset=synthetic",
    "dataset.train_size=640",
    "dataset.test_size=64",
    *TINY_MODEL,
    "loader.batch_size=32",
    "loader.num_workers=0",
    "trainer.max_epochs=3",
    "trainer.progress_bar=false",
    "export.formats=[]",
]


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's header, then LevelDB-style log blocks of 32 KiB whose pieces
    (7-byte headers: checksum, length, type) join into protobuf Record messages."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def wandb_history(run_dir: Path) -> tuple[set[str], list[list[tuple[int, dict]]]]:
    """The run ids and, per offline run folder (one per process that trained), its (step, metrics) rows."""
    ids, files = set(), []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        rows = []
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                values = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                rows.append(
                    (record.history.step.num, {k: v for k, v in values.items() if not k.startswith("_")})
                )
        files.append(rows)
    return ids, files


def test_every_logger_gets_every_step_once_across_a_stop_and_resume(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    run_dir, database = tmp_path / "run", tmp_path / "mlflow.db"
    args = [
        *ARGS,
        "logger=[tensorboard,csv,mlflow,wandb]",
        f"logger.mlflow.tracking_uri=sqlite:///{database}",
        "logger.mlflow.artifacts=true",
        f"logger.mlflow.artifact_location={tmp_path / 'artifacts'}",
        f"hydra.run.dir={run_dir}",
    ]
    process = start_trainer(*args)
    log = run_dir / "train.log"
    while not (log.is_file() and "epoch 1 |" in log.read_text()):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # inside epoch 2: the guard saves there and exits 143
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    resumed = run_trainer(*args, f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    # Every logger: the three epochs' steps (18 an epoch: 576 training samples) and the test's, each once,
    # with the same values.
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header, table = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert [int(r["step"]) for r in table] == [18, 36, 54] and "val/acc" in header and "test/acc" in header
    csv_values = {
        (int(r["step"]), k): float(v) for r in table for k, v in r.items() if k != "step" and v != ""
    }
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("train/loss", "val/acc", "lr"):
        points = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in points] == [18, 36, 54]
        assert all(v == pytest.approx(csv_values[(s, key)], rel=1e-6) for s, v in points)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    runs = client.search_runs([client.get_experiment_by_name("trainer").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed run continued the same one
    run = runs[0]
    assert run.data.params["optimizer.lr"] == "0.1" and run.data.params["model.name"] == "cnn"
    for key in ("train/loss", "val/acc", "val/loss", "lr", "test/acc"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        expected = sorted((s, v) for (s, k), v in csv_values.items() if k == key)
        assert [s for s, _ in history] == [s for s, _ in expected], key  # each step once
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-9), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"checkpoints", "export"}
    assert list((tmp_path / "artifacts").rglob("best.pt"))  # where the experiment was told to keep them

    ids, files = wandb_history(run_dir)
    assert len(ids) == 1 and len(files) == 2  # one W&B run, written by two processes
    for rows_of_file in files:
        steps = [s for s, _ in rows_of_file]
        assert steps == sorted(set(steps))  # each file's steps increase, as W&B requires
    seen: dict[int, dict] = {}
    for step, values in (row for rows_of_file in files for row in rows_of_file):
        assert step not in seen, (
            step
        )  # W&B keeps every copy of a step: the resumed run must not send it again
        seen[step] = values
    assert sorted(seen) == [18, 36, 54]
    assert all(
        v == pytest.approx(csv_values[(s, k)], rel=1e-6)
        for s, values in seen.items()
        for k, v in values.items()
    )


class Tracker:
    name, rewinds = "fake", False

    def __init__(self):
        self.points = []

    def write(self, metrics, step, at=None):
        self.points.append((step, at, metrics))

    def state_dict(self):
        return {"id": "x"}

    def close(self, finished):
        self.finished = finished


def test_a_tracker_gets_a_point_once_a_checkpoint_covers_it_and_never_twice_after_a_kill(tmp_path):
    record = tmp_path / "trackers_sent.json"
    tracker = Tracker()
    metrics = MetricLog([tracker], sent_record=record)
    metrics.write({"val/acc": 0.5}, step=10)
    assert tracker.points == []  # no checkpoint covers step 10 yet
    saved = metrics.state_dict()  # what the checkpoint of step 10 holds, taken before it lands
    metrics.checkpointed(10)
    ((step, at, values),) = tracker.points
    assert (step, values) == (10, {"val/acc": 0.5}) and saved["state"] == {"fake": {"id": "x"}}
    metrics.write({"val/acc": 0.6}, step=20)  # then killed: step 20 never reaches the tracker
    again = Tracker()
    MetricLog(
        [again], held=saved["held"], resume_step=10, sent_record=record
    )  # resumed from step 10's checkpoint
    assert again.points == []  # step 10 was sent (the record says so): not again
    record.unlink()  # killed after the checkpoint of step 10 landed, before its points were sent
    late = Tracker()
    MetricLog([late], held=saved["held"], resume_step=10, sent_record=record)
    assert late.points == [(10, at, {"val/acc": 0.5})]  # the resumed run sends it, with the time it was made
    stopped = Tracker()
    log = MetricLog([stopped])
    log.write({"val/acc": 0.7}, step=30)
    log.close(finished=False)  # a signal's exit before any checkpoint covered step 30
    assert stopped.points == [] and stopped.finished is False


def test_a_tracker_that_is_not_installed_or_unknown_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    code, err = refused_in_process(monkeypatch, capsys, "logger=[tensorboard,mlflow]", "trainer.max_epochs=1")
    assert (
        code == 2 and 'logger=mlflow: needs mlflow, which is not installed: pip install -e ".[mlflow]"' in err
    )
    code, err = refused_in_process(monkeypatch, capsys, "logger=[tensorboard,neptune]")
    assert code == 2 and "logger=neptune: no such option; choose from csv, mlflow, tensorboard, wandb" in err
    code, err = refused_in_process(monkeypatch, capsys, "+logger.csv.colour=red")
    assert code == 2 and "logger.colour: not a parameter of logger 'csv'" in err


def test_the_csv_drops_what_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    from trainer.core.registry import LOGGERS

    first = LOGGERS.build("csv", run_dir=tmp_path, resume_step=None, state={}, config={})
    first.write({"val/acc": 0.5}, 10)
    first.write({"val/acc": 0.6, "lr": 0.1}, 20)  # then killed; the newest checkpoint is step 10's
    resumed = LOGGERS.build("csv", run_dir=tmp_path, resume_step=10, state={}, config={})
    resumed.write({"val/acc": 0.7, "lr": 0.1}, 20)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,val/acc,lr", "10,0.5,", "20,0.7,0.1"]
