"""`python -m trainer.reference [framework|groups]`: the configuration reference in Markdown, generated
from the config's single source: the schema's fields (their default, range and meaning, trainer/config.py)
and every group file's keys (their default and comment, conf/<group>/<name>.yaml). The README's table
and the documentation's reference pages are this output, so they cannot drift from the code."""

import dataclasses
import re
import sys
from typing import Any

from trainer.config import Config
from trainer.core.registry import CONF


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value in ("32", "16") else value
    return str(value).replace("'", "")


def framework_rows() -> list[tuple[str, str, str, str]]:
    """(key, default, range, meaning) of every framework key, in the schema's order."""
    rows = []
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.type):
            for field in dataclasses.fields(section.type):
                rows.append(_row(f"{section.name}.{field.name}", field))
        elif section.metadata:
            rows.append(_row(section.name, section))
    return rows


def _row(key: str, field: dataclasses.Field) -> tuple[str, str, str, str]:
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    check = field.metadata.get("check")
    return key, _value(default), check.needs if check else "", field.metadata.get("meaning", "")


def framework_table() -> str:
    lines = ["| key | default | valid values | meaning |", "| --- | --- | --- | --- |"]
    lines += [
        f"| `{key}` | `{default}` | {needs} | {meaning} |"
        for key, default, needs, meaning in framework_rows()
    ]
    return "\n".join(lines)


def group_rows(group: str) -> list[tuple[str, str, str, str]]:
    """(entry, key, default, comment) of every key of every file of a config group."""
    rows = []
    for path in sorted((CONF / group).glob("*.yaml")):
        for line in path.read_text().splitlines():
            match = re.match(r"^([a-z_]+): *(.*?)\s*(?:#\s*(.*))?$", line)
            if match and match.group(1) != "name" and not line.startswith(" "):
                rows.append((path.stem, match.group(1), match.group(2), match.group(3) or ""))
    return rows


def group_tables(groups: tuple[str, ...] = ("model", "dataset", "task", "optimizer", "scheduler")) -> str:
    parts = []
    for group in groups:
        parts += [f"### {group}", "", "| entry | key | default | meaning |", "| --- | --- | --- | --- |"]
        parts += [
            f"| {group}={entry} | `{key}` | `{default}` | {meaning} |"
            for entry, key, default, meaning in group_rows(group)
        ]
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    which = (argv if argv is not None else sys.argv[1:]) or ["framework"]
    print(framework_table() if which[0] == "framework" else group_tables())


if __name__ == "__main__":
    main()
