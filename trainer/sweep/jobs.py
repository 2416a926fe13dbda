"""The job side of a sweep: each job records what it is and how it ended (job.json); a job that fails is
recorded and the sweep goes on; the same command again skips finished jobs and resumes interrupted ones."""

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from trainer.core import distributed
from trainer.core.errors import UserError
from trainer.sweep.summary import JOB_RECORD, monitor_of, read_record, refresh_summary, write_json

log = logging.getLogger("trainer")


def run_sweep_job(cfg: DictConfig, run: Callable[[DictConfig], float | None]) -> float | None:
    """One job of a multirun. Returns the monitored metric's best value, or None when the job failed
    (Hydra's sweepers then go on; Optuna records the trial as failed)."""
    hydra = HydraConfig.get()
    job_dir, overrides = Path(hydra.runtime.output_dir), list(hydra.overrides.task)
    previous = read_record(job_dir)
    if previous is not None and previous.get("overrides") != overrides:
        message = (
            f"hydra.sweep.dir: {job_dir} holds another job's results ({' '.join(previous['overrides'])}); "
            f"run this sweep with a new hydra.sweep.dir"
        )
        log.error(message)
        _record(job_dir, {**previous, "conflict": {"overrides": overrides, "error": message}}, cfg)
        return None
    if previous is not None and previous.get("status") == "done" and (job_dir / "metrics.json").is_file():
        log.info("job %s finished in an earlier run of this sweep (metrics.json); skipped", job_dir.name)
        return previous.get("best")
    if (job_dir / "checkpoints").is_dir():
        with open_dict(cfg):
            cfg.resume = "auto"  # an interrupted job: continue from its newest valid checkpoint
    record = {
        "overrides": overrides,
        "status": "running",
        "monitor": monitor_of(cfg),
        "wall_time_s": (previous or {}).get("wall_time_s", 0.0),
        "runs": (previous or {}).get("runs", 0) + 1,
    }
    _record(job_dir, record, cfg, summary=False)
    started = time.perf_counter()
    try:
        record["best"] = run(cfg)
        record["status"] = "done"
        return record["best"]
    except SystemExit as e:
        if e.code != 1:  # a signal (130, 143) or a scheduler's requeue: stop; the sweep's next run resumes it
            record["status"] = "interrupted"
            raise
        record.update(status="failed", error=_last_error(job_dir) or "exit code 1")  # e.g. an export failed
        return None
    except UserError as e:
        record.update(status="failed", error=str(e))
        log.error("job %s failed: %s", job_dir.name, e)
        return None
    except Exception as e:  # a crash: the traceback goes to the job's train.log, the sweep goes on
        log.error("job %s crashed:\n%s", job_dir.name, traceback.format_exc())
        record.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        return None
    finally:
        record["wall_time_s"] += time.perf_counter() - started
        _record(job_dir, record, cfg)


def _record(job_dir: Path, record: dict, cfg: DictConfig, summary: bool = True) -> None:
    """job.json, and the sweep's summary; by rank 0 alone in a job of several processes."""
    if distributed.is_main():
        write_json(job_dir / JOB_RECORD, record)
        if summary:
            refresh_summary(job_dir.parent, monitor_of(cfg))


def _last_error(job_dir: Path) -> str | None:
    """The last ERROR line of the job's log (an export that failed, for instance)."""
    try:
        lines = (job_dir / "train.log").read_text().splitlines()
    except OSError:
        return None
    return next((line.split("[ERROR] ", 1)[1] for line in reversed(lines) if "[ERROR] " in line), None)
