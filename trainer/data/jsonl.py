"""JSON Lines, read one object a line, for the manifest, text and text-classification datasets."""

import json
from collections.abc import Iterator
from pathlib import Path

from trainer.core.errors import UserError


def json_lines(path: Path, key: str, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of `path` (or of `text`, its content); a line that
    is not a JSON object is the user's error, named by `key` (the setting that named the file)."""
    content = path.read_text(encoding="utf-8") if text is None else text
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{key}: {path} line {number} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{key}: {path} line {number} is not a JSON object")
        yield number, row
