"""Resuming, in one place: which checkpoint a run continues from (read once, verified, checked against
the config), and the command line that continues a run in its own folder with its own config.

Each builder of the recipe takes its slice of the state (`resume.part("optimizer")`), so a fresh run
and a resumed one are built by the same code."""

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.config import Config
from trainer.core.cli import override_key
from trainer.core.errors import UserError

log = logging.getLogger("trainer")
# Keys of the dataset config that do not change what a checkpoint's model was trained to do.
DATASET_LOCATION_KEYS = {"root", "download", "verify_checksum", "cache"}
SECTIONS = {f.name for f in dataclasses.fields(Config)}


@dataclasses.dataclass
class Resume:
    """The checkpoint a run continues from; `state` is None for a fresh run."""

    state: dict[str, Any] | None = None
    source: str | None = None  # what resume= named

    @property
    def fresh(self) -> bool:
        return self.state is None

    def part(self, key: str, default: Any = None) -> Any:
        """One component's slice of the state (the model's weights...); `default` for a fresh run."""
        return default if self.state is None else self.state.get(key, default)

    @classmethod
    def load(cls, cfg: DictConfig, run_dir: Path) -> "Resume":
        """The state `resume=` points at: a checkpoint file (verified, no fallback), a run dir's newest
        valid checkpoint, or with `auto` this run dir's newest valid checkpoint when there is one."""
        from trainer.core.checkpoint import load_checkpoint  # torch: only when resuming
        from trainer.core.sharded_checkpoint import SUFFIX, load_folder

        source = cfg.resume
        if source is None:
            return cls()
        if source == "auto":
            try:
                state = newest(run_dir / "checkpoints")
            except UserError as e:
                log.warning("resume=auto: %s; starting fresh", str(e).removeprefix("resume: "))
                return cls()
        elif Path(source).is_dir() and Path(source).suffix == SUFFIX:  # one sharded checkpoint
            state = load_folder(Path(source))
        elif Path(source).is_dir():
            state = newest(Path(source) / "checkpoints")
        else:
            state = load_checkpoint(Path(source))
        refuse_older(state["config"], source)
        check_compatible(state["config"], OmegaConf.to_container(cfg, resolve=True))
        return cls(state, source)


def newest(checkpoints: Path) -> dict[str, Any]:
    """The newest valid checkpoint of a run, single-file (last.pt, step-N.pt, best.pt) or sharded (a
    step-N-E.dcp folder): a run may have been resumed with another trainer.strategy."""
    from trainer.core.checkpoint import newest_valid
    from trainer.core.sharded_checkpoint import has_sharded, newest_valid_folder

    sharded = has_sharded(checkpoints)
    # An fsdp run's single files are only best.pt (the whole model, no optimizer state): not read then.
    files = not sharded or (checkpoints / "last.pt").is_file() or any(checkpoints.glob("step-*.pt"))
    found, problems = [], []
    for wanted, newest_of in ((sharded, newest_valid_folder), (files, newest_valid)):
        if not wanted:
            continue
        try:
            found.append(newest_of(checkpoints)[1])
        except UserError as e:
            problems.append(e)
    if not found:
        raise problems[-1]
    found = [s for s in found if s.get("optimizer", True) is not None] or found  # not an fsdp best.pt
    return max(found, key=lambda s: (s["progress"]["step"], s["progress"]["epoch"]))


def refuse_older(saved: dict[str, Any], source: str) -> None:
    """A run written by a version of trainer whose config had other sections cannot be continued here."""
    if set(saved) != SECTIONS:
        raise UserError(
            f"resume: {source} was written by an older version of trainer (its config has other sections: "
            f"{', '.join(sorted(set(saved) ^ SECTIONS))}); start a new run, or continue it with that version"
        )


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A checkpoint's model only fits the architecture and data it was trained for; changes to the
    optimizer or schedule are allowed, and said. (recipe=ppo has no dataset or task: an environment.)"""
    saved, current = (
        {**config, **{g: config.get(g) or {} for g in ("dataset", "task", "env")}}
        for config in (saved, current)
    )
    if saved.get("recipe") != current.get("recipe"):
        raise UserError(
            f"recipe: the checkpoint was trained with recipe={saved.get('recipe')}; resume with it, or "
            f"start a new run"
        )
    differences = [
        f"{group}.{key}: {saved[group].get(key)!r} -> {current[group].get(key)!r}"
        for group in ("model", "dataset", "env")
        for key in sorted(set(saved[group]) | set(current[group]))
        if saved[group].get(key) != current[group].get(key)
        and not (group == "dataset" and key in DATASET_LOCATION_KEYS)
    ]
    if differences:
        raise UserError(
            f"resume: the checkpoint was trained with another model, dataset or environment "
            f"({'; '.join(differences)}); resume with the original settings, or start a new run"
        )
    if saved["task"].get("name") != current["task"].get("name"):
        raise UserError(
            f"task.name: the checkpoint was trained for task={saved['task']['name']}; resume with "
            f"task={saved['task']['name']}, or start a new run"
        )
    if (
        saved["optimizer"]["name"] != current["optimizer"]["name"]
        and not current["checkpoint"]["reset_optimizer"]
    ):
        raise UserError(
            f"optimizer.name: the checkpoint's optimizer is {saved['optimizer']['name']}; resume with "
            f"optimizer={saved['optimizer']['name']}, or add checkpoint.reset_optimizer=true"
        )
    for key in sorted(set(saved["scheduler"]) | set(current["scheduler"])):
        if saved["scheduler"].get(key) != current["scheduler"].get(key):
            log.warning(
                "scheduler.%s changed on resume: %r -> %r (applied)",
                key,
                saved["scheduler"].get(key),
                current["scheduler"].get(key),
            )


def resume_argv(argv: list[str]) -> list[str]:
    """`resume=<run dir or checkpoint>` continues that run in its own folder with its own config.
    Hydra composes from the command line, so the run's saved overrides are put back on it, before the
    new ones (which win), with Hydra's run dir pointed at the run."""
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if resume in (None, "auto", "null"):
        return argv
    target = Path(resume)
    if not target.exists():
        raise UserError(f"resume: {resume} does not exist; give a run dir, a checkpoint file, or auto")
    run_dir = target if target.is_dir() and target.suffix != ".dcp" else target.parent.parent
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        if target.is_dir():
            raise UserError(
                f"resume: {resume} is not a run dir (no .hydra/overrides.yaml); give the run's folder "
                f"under outputs/, or a checkpoint file"
            )
        return argv  # a checkpoint outside any run: a new run dir, with the config on this command line
    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("resume: resuming one run cannot be combined with -m/--multirun")
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        refuse_older(OmegaConf.to_container(OmegaConf.load(config)), resume)
    flags, given = [a for a in argv[1:] if a.startswith("-")], [a for a in argv[1:] if not a.startswith("-")]
    given_keys = {override_key(a) for a in given} | {"hydra.run.dir"}
    replayed = [o for o in OmegaConf.load(saved) if override_key(o) not in given_keys]
    hydra_saved = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.overrides.hydra
    replayed += [
        o for o in hydra_saved if override_key(o) == "hydra.searchpath" and override_key(o) not in given_keys
    ]
    return [argv[0], *flags, *replayed, *given, f"hydra.run.dir={run_dir.resolve()}"]
