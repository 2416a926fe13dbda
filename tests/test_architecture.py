"""The house rules that keep the code easy to change: imports follow the layers stated in
pyproject.toml (entry points -> parts -> foundations, no cycles, predict and serve clear of training),
files stay near 300 lines unless they say why, and every default lives in one place."""

import ast
import dataclasses
import shutil
import subprocess

import pytest
import yaml
from conftest import CONF, ROOT

from trainer.config import Config


def test_the_import_contracts_hold():
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (the dev extra)")
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_long_files_say_why_at_the_top():
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 320:
            reason = "Longer than 300 lines" in (ast.get_docstring(ast.parse(text)) or "")
            assert reason, (
                f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines and no reason in its docstring"
            )


def _yaml_defaults() -> dict:
    """What conf/config.yaml and conf/trainer/default.yaml set for the schema'd sections."""
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    sections = {key: top[key] for key in ("loader", "loss", "checkpoint", "export") if key in top}
    sections["trainer"] = {
        k: v
        for k, v in yaml.safe_load((CONF / "trainer" / "default.yaml").read_text()).items()
        if k != "defaults"
    }
    sections["top"] = {key: top[key] for key in ("seed", "resume", "imports")}
    return sections


def test_the_schema_and_the_yaml_agree_on_every_default():
    """A default is read from the YAML by a run, and from the schema by code that builds a config
    without Hydra: the two must say the same (before, max_epochs was 10 in one and 30 in the other)."""
    schema = Config()
    for section, values in _yaml_defaults().items():
        target = schema if section == "top" else getattr(schema, section)
        known = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            assert key in known, f"{section}.{key} is in the YAML but not in the schema"
            assert getattr(target, key) == value, (
                f"{section}.{key}: schema {getattr(target, key)!r}, YAML {value!r}"
            )
