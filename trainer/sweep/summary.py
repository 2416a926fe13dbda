"""A sweep's summary (CSV, Markdown, a chart) after every job and at the end, from the jobs' records;
`SweepSummary` is the Hydra callback (conf/config.yaml: hydra.callbacks)."""

import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainer.core.atomic import write_text

log = logging.getLogger("trainer")

JOB_RECORD = "job.json"


def monitor_of(cfg: DictConfig) -> str:
    """The job's checkpoint.monitor, or its task's default (recipe=ppo: the evaluation return)."""
    if cfg.get("recipe") == "ppo":
        return cfg.checkpoint.monitor or "eval/return"
    from trainer.config import params_of
    from trainer.core.registry import TASKS
    from trainer.tasks.base import resolve_monitor

    return resolve_monitor(TASKS.build(cfg.task.name, **params_of(cfg.task)), cfg.checkpoint.monitor, None)[0]


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1))


def read_record(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / JOB_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The validation and test metrics the jobs report (the task's: val/acc for classification, val/map
    for multilabel...), in the order they first appear, then epochs."""
    keys = dict.fromkeys(k for r in rows for k in r["metrics"] if k.startswith(("val/", "test/")))
    return sorted(keys, key=lambda k: (not k.startswith("val/"), k.endswith("loss"))) + ["epochs"]


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder that has a record, in job order."""
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_order):
        record = read_record(job_dir)
        if record is None:
            continue
        try:
            metrics = json.loads((job_dir / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):
            metrics = {}
        status = "conflict" if "conflict" in record else record.get("status", "?")
        error = record.get("conflict", {}).get("error") or record.get("error", "")
        rows.append(
            {
                "job": job_dir.name,
                "status": status,
                "overrides": " ".join(record.get("overrides", [])),
                "best": record.get("best"),
                "metrics": metrics,
                "wall_time_s": round(record.get("wall_time_s", 0.0), 1),
                "error": error,
            }
        )
    return rows


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (sys.maxsize, path.name)


def refresh_summary(sweep_dir: Path, monitor: str) -> list[dict[str, Any]]:
    """Writes sweep_summary.csv, .md and .png from what the job folders hold now."""
    rows = collect(sweep_dir)
    if not rows:
        return rows
    metrics = metric_columns(rows)
    columns = ["job", "status", "overrides", f"best {monitor}", *metrics, "wall_time_s", "error"]
    table = [
        [
            r["job"],
            r["status"],
            r["overrides"],
            r["best"],
            *(r["metrics"].get(k) for k in metrics),
            r["wall_time_s"],
            r["error"],
        ]
        for r in rows
    ]
    text = io.StringIO()
    csv.writer(text).writerows([columns, *table])
    write_text(sweep_dir / "sweep_summary.csv", text.getvalue())
    varying = varying_keys(rows)  # the table shows what tells the jobs apart; the CSV has every override
    for row in table:
        row[2] = " ".join(o for o in row[2].split() if o.partition("=")[0] in varying) or row[2]
    done = sum(r["status"] == "done" for r in rows)
    lines = [
        f"# Sweep summary: {done} of {len(rows)} jobs done",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table]
    write_text(sweep_dir / "sweep_summary.md", "\n".join(lines) + "\n")
    plot_summary(rows, monitor, sweep_dir / "sweep_summary.png")
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/")


def varying_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The overrides whose values differ between jobs (a key some jobs lack differs too)."""
    parsed = [dict(item.partition("=")[::2] for item in row["overrides"].split()) for row in rows]
    keys = dict.fromkeys(k for overrides in parsed for k in overrides)
    return [k for k in keys if len({overrides.get(k) for overrides in parsed}) > 1]


def swept_parameter(rows: list[dict[str, Any]]) -> str | None:
    """The one override whose value differs between jobs, if there is exactly one."""
    varying = varying_keys(rows)
    return varying[0] if len(varying) == 1 else None


def plot_summary(rows: list[dict[str, Any]], monitor: str, path: Path) -> None:
    """The monitored metric per job, or against the swept parameter when exactly one varies; failed
    jobs are marked. Needs matplotlib (the `plot` extra); without it, only the tables are written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info('sweep_summary.png needs matplotlib: pip install "trainer[plot]"')
        return
    parameter = swept_parameter(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    ok = [r for r in rows if r["status"] == "done" and r["best"] is not None]
    bad = [r for r in rows if r not in ok]
    if parameter is not None:

        def x_of(row):
            value = dict(item.partition("=")[::2] for item in row["overrides"].split())[parameter]
            try:
                return float(value)
            except ValueError:
                return value

        xs = [x_of(r) for r in ok]
        numeric = all(isinstance(x, float) for x in xs + [x_of(r) for r in bad])
        pairs = list(zip(xs, (r["best"] for r in ok)))
        pairs = sorted(pairs, key=lambda p: p[0]) if numeric else pairs
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "o-" if numeric else "o")
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        for r in bad:
            ax.axvline(x_of(r) if numeric else str(x_of(r)), color="red", linestyle=":", alpha=0.6)
        ax.set_xlabel(parameter)
    else:
        varying = varying_keys(rows)
        labels = [
            " ".join(o for o in r["overrides"].split() if o.partition("=")[0] in varying) or r["job"]
            for r in rows
        ]
        for x, r in enumerate(rows):
            if r in ok:
                ax.bar(x, r["best"], color="tab:blue")
            else:
                ax.annotate(r["status"], (x, 0), ha="center", va="bottom", color="red", rotation=90)
        ax.set_xticks(range(len(rows)), [label.replace(" ", "\n") for label in labels], fontsize=7)
        ax.set_xlabel("job")
    ax.set_ylabel(f"best {monitor}")
    ax.set_title(f"{len(ok)} of {len(rows)} jobs done" + (f"; red: {len(bad)} not done" if bad else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SweepSummary(Callback):
    """At the end of a multirun: the final summary, and, when a job did not finish, a one-line
    message and exit code 1 (Hydra turns exceptions raised by callbacks into warnings, so the exit
    is raised as SystemExit, after everything else is done)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = refresh_summary(sweep_dir, monitor_of(config))
        failed = [r for r in rows if r["status"] != "done"]
        log.info("sweep summary: %s (.csv, .png)", sweep_dir / "sweep_summary.md")
        if failed:
            first, varying = failed[0], varying_keys(rows)
            which = " ".join(o for o in first["overrides"].split() if o.partition("=")[0] in varying)
            print(
                f"error: sweep: {len(failed)} of {len(rows)} jobs did not finish (job {first['job']}"
                f"{', ' + which if which else ''}: {first['error'] or first['status']}); see "
                f"{sweep_dir / 'sweep_summary.md'}",
                file=sys.stderr,
            )
            raise SystemExit(1)
