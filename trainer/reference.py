"""`python -m trainer.reference [framework|groups]`: the configuration reference in Markdown, generated
from the config's single source: the schema's fields (their default, range and meaning, trainer/config.py)
and every group file's keys (their default and comment, conf/<group>/<name>.yaml; their valid values
from the entries' annotations). The documentation's configuration reference (docs/reference/config.md)
is this output, generated when the site builds, so it cannot drift from the code."""

import dataclasses
import re
import sys
from typing import Any

import yaml

from trainer.config import Config
from trainer.core import registry as registries
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


# Keys that many dataset files share: their meaning, said once here instead of in every file. A comment
# on the key's own line wins.
SHARED = {
    "root": "where the data is (torchvision datasets: where it is downloaded to)",
    "download": "fetch the files when they are not under root (with retries, checksums checked)",
    "verify_checksum": "check the files' MD5 sums (false: for copies you made yourself)",
    "in_channels": "image channels: 3 (RGB) or 1 (grey)",
    "image_size": "the side, in pixels, that images are resized and cropped to",
    "num_classes": "how many classes (the model's outputs follow)",
    "val_split": "hold out this fraction of train for validation (0: validate on the val or test split)",
    "mean": "per-channel mean, subtracted after scaling pixels to [0, 1]",
    "std": "per-channel standard deviation, divided by after the mean",
    "augment": "torchvision.transforms.v2 steps by name, for training images only",
    "train_size": "training samples to make",
    "val_size": "validation samples to make",
    "test_size": "test samples to make",
    "noise": "how much noise is added to the signal",
    "seed": "the data's own seed: the same data whatever the run's seed",
    "max_image_pixels": "an image over this many pixels counts as unreadable (read before decoding)",
    "image_column": "the column that holds the images",
    "label_column": "the column that holds the labels",
    "split_train": "the split to train on",
}


def group_rows(group: str) -> list[tuple[str, str, str, str, str]]:
    """(entry, key, default, valid values, meaning) of every key of every file of a config group; the
    keys of a mapping are named with its own (`lora.r`; a logger's file is one mapping, under its name)."""
    typed = [r for r in vars(registries).values() if isinstance(r, registries.Registry) and r.group == group]
    rows = []
    for path in sorted((CONF / group).glob("*.yaml")):
        text = path.read_text()
        lines, entry = _key_lines(text), yaml.safe_load(text) or {}
        builder = entry.get("name", path.stem)  # its registry's name for it (env=cartpole: gymnasium)
        registry = typed[0] if typed and builder in typed[0] else None
        for key, value in entry.items():
            if key == "name":
                continue
            nested = {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
            for name, parsed in nested.items():
                default, comment = lines[name]
                default = default or yaml.safe_dump(parsed, default_flow_style=True, width=200).strip()
                needs = registry.parameter_needs(builder, name) if registry and "." not in name else ""
                rows.append((path.stem, name, default, needs, comment or SHARED.get(name, "")))
    return rows


def _key_lines(text: str) -> dict[str, tuple[str, str]]:
    """Each key's default as written and the comment on its line, by its name (`parent.key` when
    indented under a mapping): what YAML parsing drops."""
    found, parent = {}, ""
    for line in text.splitlines():
        match = re.match(r"^( *)([a-z_]+): *(.*?)\s*(?:#\s*(.*))?$", line)
        if match:
            indent, key, default, comment = match.groups()
            parent = parent if indent else key
            found[f"{parent}.{key}" if indent else key] = (default, comment or "")
    return found


def group_tables(
    groups: tuple[str, ...] = ("model", "dataset", "task", "optimizer", "scheduler", "env", "logger"),
) -> str:
    parts = []
    for group in groups:
        parts += [
            f"### {group}",
            "",
            "| entry | key | default | valid values | meaning |",
            "| --- | --- | --- | --- | --- |",
        ]
        parts += [
            "| "
            + " | ".join(
                cell.replace("|", "\\|")
                for cell in (
                    f"{group}={entry}",
                    f"`{key}`",
                    f"`{default}`" if "|" not in default else default,
                    needs,
                    meaning,
                )
            )
            + " |"
            for entry, key, default, needs, meaning in group_rows(group)
        ]
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    which = (argv if argv is not None else sys.argv[1:]) or ["framework"]
    print(framework_table() if which[0] == "framework" else group_tables())


if __name__ == "__main__":
    main()
