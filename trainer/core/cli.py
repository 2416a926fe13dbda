"""The shell around every command: exit codes, one-line errors, user imports, usage."""

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
        choices = ", ".join(options)
        return f"{group}={wanted}: no such option; choose from {choices} (e.g. {group}=[{options[0]}])"
    cause: BaseException | None = error
    while cause is not None:  # our own message, raised inside a config resolver, says it best
        if isinstance(cause, UserError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    override = re.search(r"Could not override '([^']+)'", str(error))
    if override:  # Hydra's advice (append it with +) would add a key nothing reads
        return (
            f"{override.group(1)}: not a key of the config (nothing reads it); fix the spelling, or drop it"
        )
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
        "Every key: python -m trainer.reference. The guides: docs/ (mkdocs serve, with the docs extra)",
    ]
    return "\n".join(lines)
