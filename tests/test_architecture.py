"""The house rules that keep the code easy to change: imports follow the layers stated in
pyproject.toml (entry points -> parts -> foundations, no cycles, predict and serve clear of training),
files stay near 300 lines unless they say why, and every default lives in one place."""

import ast
import dataclasses
import shutil
import subprocess
import sys

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


def test_every_default_is_written_in_exactly_one_place():
    """The framework's keys (trainer.*, loader.*, ..., seed) have their defaults in the schema only: the
    base config file sets none of them. A registry entry's parameters have theirs in its config file
    only: its builder takes each without a default, and takes nothing else but what the framework hands
    it (the model to an optimizer, the data's facts to a model, which keep a signature default where
    they have one). So `--cfg job` shows every key, and no value exists twice to drift apart."""
    import inspect

    from trainer.config import GROUPS
    from trainer.core.registry import DATASETS, LOGGERS, MODELS, OPTIMIZERS, SCHEDULERS, TASKS
    from trainer.data import DATA_FACTS

    base = yaml.safe_load((CONF / "config.yaml").read_text())
    framework = {f.name for f in dataclasses.fields(Config)} - set(GROUPS) - {"logger"}
    assert not framework & set(base), f"conf/config.yaml sets schema keys: {framework & set(base)}"
    provided = {**GROUPS, "model": DATA_FACTS, "logger": ("run_dir", "resume_step", "state", "config")}
    checked = 0
    for registry in (MODELS, DATASETS, TASKS, OPTIMIZERS, SCHEDULERS, LOGGERS):
        for name in registry.names():
            text = yaml.safe_load((CONF / registry.group / f"{name}.yaml").read_text()) or {}
            keys = set((text.get(name) or {}) if registry.nested else text) - (
                {"name"} if not registry.nested else set()
            )
            builder = registry.get(name)
            parameters = inspect.signature(builder).parameters
            given = set(parameters) - set(provided[registry.group])
            assert keys == given, (
                f"conf/{registry.group}/{name}.yaml holds {sorted(keys)}; the builder takes {sorted(given)}"
            )
            doubled = [key for key in keys if parameters[key].default is not inspect.Parameter.empty]
            assert not doubled, (
                f"{registry.group} {name}: {doubled} default in the signature and the config file"
            )
            checked += 1
    assert checked >= 30  # every built-in entry of every registry


def test_the_sites_configuration_reference_is_generated_from_the_schema_and_the_groups():
    """docs/reference/config.md holds markers that the site's build hook (docs/hooks.py) replaces with
    `python -m trainer.reference`'s tables: a default changed in code cannot leave the docs behind."""
    import importlib.util

    from trainer.config import Config
    from trainer.reference import framework_table, group_tables

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.on_page_markdown((ROOT / "docs" / "reference" / "config.md").read_text())
    assert framework_table() in page and group_tables() in page and "<!-- reference" not in page
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.type) if dataclasses.is_dataclass(section.type) else []:
            assert f"| `{section.name}.{field.name}` |" in page


def test_every_group_key_says_what_it_means():
    """The reference lists each group file's keys with a meaning: its comment, or the shared one that
    trainer/reference.py gives keys many dataset files have. A key added without one fails here."""
    from trainer.reference import group_rows

    groups = ("model", "dataset", "task", "optimizer", "scheduler", "env", "logger")
    rows = [(group, *row) for group in groups for row in group_rows(group)]
    assert len(rows) > 200
    listed = {(g, entry, key) for g, entry, key, *_ in rows}
    expected = {
        ("dataset", "synthetic", "augment"),
        ("model", "hf", "lora.r"),
        ("logger", "csv", "csv.filename"),
    }
    assert expected <= listed
    assert [f"{g}={entry}: {key}" for g, entry, key, _, _, meaning in rows if not meaning] == []


def test_commands_that_train_nothing_do_not_import_the_heavy_libraries():
    """A config check, predict, serve and generate import no torchmetrics (seconds and hundreds of MB:
    it loads scipy, matplotlib and transformers), nor transformers itself: only what builds metrics or
    a model=hf model does. A fresh interpreter, so that nothing this test process imported counts."""
    code = """
import sys
import trainer.predict, trainer.serve, trainer.generate, trainer.tasks, trainer.models, trainer.data
from trainer.core.registry import MODELS, TASKS
TASKS.check("classification", {}), MODELS.check("hf", {"pretrained": "gpt2"}, optional=("target",))
heavy = ("torchmetrics", "transformers", "scipy", "matplotlib")
print(sorted(name for name in heavy if name in sys.modules))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
