"""The shell around a run: exit codes, one-line errors, the argv of a resume, user imports."""

import contextlib
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from trainer.core.errors import UserError

log = logging.getLogger("trainer")


def _one_line(error: BaseException) -> str:
    """Hydra and OmegaConf explain over several lines with internals; keep what names the key and the fix."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.options:
        group = (error.missing_cfg_file or "").split("/")[0] or "config"
        wanted = (error.missing_cfg_file or "").split("/")[-1]
        return f"{group}={wanted}: no such option; choose one of {', '.join(error.options)}"
    unknown = re.search(r"Could not load '(\w+)/([^']+)'", str(error))
    if isinstance(error, MissingConfigException) and unknown:  # one of a list, e.g. logger=[tensorboard,foo]
        group, wanted = unknown.groups()
        from trainer.core.registry import CONF

        folder = CONF / group
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        return f"{group}={wanted}: no such option; choose from {', '.join(options)} (e.g. {group}=[{options[0]}])"
    cause: BaseException | None = error
    while cause is not None:  # our own message, raised inside a config resolver, says it best
        if isinstance(cause, UserError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    missing = re.search(r"Missing mandatory value: (\S+)", str(error))
    if missing:
        return f"{missing.group(1)}: required and not set; add {missing.group(1)}=... to the command line"
    text = str(error) if error.__cause__ is None else f"{error}: {error.__cause__}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    noise = r"(full_key|object_type|reference_type|msg)[:=]|Set the environment"
    keep = [ln for ln in lines if not re.match(noise, ln)]
    text = " ".join(keep or lines or [type(error).__name__])
    key = re.search(r"full_key: (\S+)", str(error))
    if key and key.group(1) not in text:
        text = f"{key.group(1)}: {text}"
    missing_key = re.search(r"Interpolation key '(dataset\.\w+)' not found", text)
    if missing_key:  # e.g. model=gpt (vocab_size) with an image dataset, or an image model with dataset=text
        text += (
            f"; the chosen model needs {missing_key.group(1)}, which this dataset does not have: choose a "
            f"model and dataset that fit (model=gpt with dataset=text, image models with image datasets)"
        )
    return text


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """0 done; 2 the user's mistake, in one line; 130/143 from the signal guard; 1 anything else, with
    its traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except UserError as e:
        message = _unwrap_worker_error(str(e))
        _log_to_files(message)
        _fail(2, message)
    except (HydraException, OmegaConfBaseException) as e:
        _fail(2, _one_line(e))
    except KeyboardInterrupt:
        _fail(130, "interrupted")
    except Exception:  # a bug, ours or in a user's code: the traceback, then the process ends, promptly
        text = traceback.format_exc()
        _log_to_files(f"unexpected error:\n{text}")
        print(text, file=sys.stderr, end="", flush=True)
        end_promptly(1)


# How long the interpreter may take to end after an unexpected error (flushing logs, joining threads)
# before the process is ended regardless.
EXIT_GRACE_S = 10.0


def end_promptly(code: int) -> None:
    """Exits with `code` now: child processes (loader workers, which ignore the stop signals) are
    killed, and a daemon timer ends the process if the interpreter's own exit steps (atexit handlers,
    non-daemon threads, a collective with a dead peer) have not finished within EXIT_GRACE_S."""
    import multiprocessing
    import threading

    for child in multiprocessing.active_children():
        child.kill()
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(code,))
    timer.daemon = True
    timer.start()
    raise SystemExit(code)


def _unwrap_worker_error(message: str) -> str:
    """A DataLoader worker's error arrives as "Caught UserError in DataLoader worker process 0" and the
    worker's traceback; the person needs only its last line, our message."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split("UserError: ", 1)[-1]


def _log_to_files(message: str) -> None:
    """Into train.log when the run dir exists; the console gets the one line from _fail, not two."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _fail(code: int, message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def import_user_modules(modules: list[str]) -> None:
    """`imports: [my_pkg.models]`: the user's registrations, without editing this package."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(
            0, os.getcwd()
        )  # `python -m` puts the working folder on the path; console scripts don't
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(
                f"imports: cannot import '{name}' ({e}); run from the folder that holds it or install it"
            ) from None
        except Exception:
            raise UserError(f"imports: importing '{name}' failed:\n{traceback.format_exc()}") from None


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def resume_argv(argv: list[str]) -> list[str]:
    """`resume=<run dir or checkpoint>` continues that run in its own folder with its own config: the
    run's saved overrides are replayed under the new ones, and Hydra's run dir is pointed at it."""
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if resume in (None, "auto", "null"):
        return argv
    target = Path(resume)
    if not target.exists():
        raise UserError(f"resume: {resume} does not exist; give a run dir, a checkpoint file, or auto")
    run_dir = target if target.is_dir() else target.parent.parent
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        if target.is_dir():
            raise UserError(
                f"resume: {resume} is not a run dir (no .hydra/overrides.yaml); give the run's folder "
                f"under outputs/, or a checkpoint file"
            )
        return argv  # a checkpoint outside any run: a new run dir, with the config on this command line
    from omegaconf import OmegaConf

    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("resume: resuming one run cannot be combined with -m/--multirun")
    flags, given = [a for a in argv[1:] if a.startswith("-")], [a for a in argv[1:] if not a.startswith("-")]
    given_keys = {override_key(a) for a in given} | {"hydra.run.dir"}
    replayed = [legacy_override(o) for o in OmegaConf.load(saved)]  # a run from before tasks: keys moved
    replayed = [o for o in replayed if override_key(o) not in given_keys]
    hydra_saved = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.overrides.hydra
    replayed += [
        o for o in hydra_saved if override_key(o) == "hydra.searchpath" and override_key(o) not in given_keys
    ]
    return [argv[0], *flags, *replayed, *given, f"hydra.run.dir={run_dir.resolve()}"]


# Keys that moved when tasks arrived: a saved run's overrides are translated, a typed one is refused.
MOVED_KEYS = {
    "loss.label_smoothing": "task.label_smoothing",
    "loss.mixup_alpha": "task.mixup_alpha",
    "loss.cutmix_alpha": "task.cutmix_alpha",
    "trainer.tta": "task.tta",
}


def legacy_override(override: str) -> str:
    """A saved override of a moved key, under its new name (`loss.label_smoothing=0.1` ->
    `task.label_smoothing=0.1`)."""
    key, sep, value = override.partition("=")
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    new = MOVED_KEYS.get(key.lstrip("+~"))
    return f"{prefix}{new}{sep}{value}" if new else override


def refuse_moved_keys(args: list[str]) -> None:
    """A key that moved (loss.label_smoothing is task.label_smoothing now): its new name, exit 2."""
    for arg in args:
        if override_key(arg) in MOVED_KEYS:
            new = MOVED_KEYS[override_key(arg)]
            raise UserError(
                f"{override_key(arg)}: moved to {new} (an option of task=classification); write "
                f"{new}={arg.partition('=')[2]}"
            )


def usage(conf_dir: Path) -> str:
    """`python -m trainer --help`: how to run it, and every config group with its options, read from
    the config folder."""
    groups = sorted(
        (folder.name, sorted(p.stem for p in folder.glob("*.yaml")))
        for folder in conf_dir.iterdir()
        if folder.is_dir() and folder.name != "hydra"
    )
    width = max(len(name) for name, _ in groups)
    lines = [
        "usage: python -m trainer [group=option ...] [key=value ...]",
        "       python -m trainer -m key=a,b ...           a sweep: one run per combination",
        "       python -m trainer resume=<run dir | checkpoint | auto> [key=value ...]",
        "",
        "Config groups (group=option):",
    ]
    lines += [f"  {name:<{width}}  {', '.join(options)}" for name, options in groups]
    lines += [
        "",
        "Show the whole config a command would run with:  python -m trainer --cfg job [overrides]",
        "Hydra's own flags (--multirun, --cfg, --info, ...):  python -m trainer --hydra-help",
        "More: README.md (config keys, resuming, sweeps, predict and serve).",
    ]
    return "\n".join(lines)
