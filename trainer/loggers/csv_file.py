"""`logger=csv`: the run's metrics.csv, a row per step that reported and a column per metric (empty
where a row has no value), for a spreadsheet or pandas.read_csv."""

import csv
import io
from pathlib import Path
from typing import Any

from trainer.core.atomic import write_text
from trainer.core.registry import LOGGERS
from trainer.loggers.base import Logger


@LOGGERS.register("csv")
class CSVFile(Logger):
    name = "csv"

    def __init__(
        self,
        *,
        run_dir: Path,
        resume_step: int | None,
        state: dict[str, Any],
        config: dict[str, Any],
        filename: str,
    ) -> None:
        self.path = run_dir / filename
        self.rows: dict[int, dict[str, float]] = {}
        if resume_step is not None and self.path.is_file():  # keep what the checkpoint covers, drop the rest
            with self.path.open(newline="") as f:
                for row in csv.DictReader(f):
                    step = int(row.pop("step"))
                    if step <= resume_step:
                        self.rows[step] = {k: float(v) for k, v in row.items() if v != ""}

    def write(self, metrics: dict[str, float], step: int, at: int | None = None) -> None:
        self.rows.setdefault(step, {}).update(metrics)
        self._save()  # whole, atomically: a few KB, once an epoch

    def _save(self) -> None:
        columns = list(dict.fromkeys(key for row in self.rows.values() for key in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["step", *columns], lineterminator="\n")
        writer.writeheader()
        for step in sorted(self.rows):
            writer.writerow({"step": step, **self.rows[step]})
        write_text(self.path, out.getvalue())
