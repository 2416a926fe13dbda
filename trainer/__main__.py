"""`python -m trainer [overrides]`: Hydra composes the config; the recipe (trainer/run/recipe.py) runs it:
build, fit, test the best checkpoint, export, write metrics.json."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.core import distributed
from trainer.core.cli import exit_codes, usage
from trainer.core.registry import CONF
from trainer.sweep.search import register_resolvers

# The training parts (loop, data, models, export) are imported inside run(): `--help`, `--cfg job`
# and a config error answer without them (benchmarks/startup.py measures it).
register_configs()
register_resolvers()


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    """Returns the best value of checkpoint.monitor, which Hydra's sweepers optimise."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from trainer.sweep.jobs import run_sweep_job

        with distributed.submitit_tasks():  # a job of several Slurm tasks: one process group
            return run_sweep_job(cfg, run)  # a failed job is recorded and the sweep goes on
    # Errors are turned into exit codes here, inside the job: past this point Hydra would add its
    # own report of a failed job to our one-line message.
    with exit_codes():
        return run(cfg)


def run(cfg: DictConfig) -> float | None:
    """One run, in the folder Hydra made for it."""
    from trainer.run.entry import run_config

    return run_config(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    # Hydra would print its own multi-line report and exit 1; we want exceptions back, to exit 2 with
    # one line for the user's mistakes and 1 with a traceback for the rest.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(usage(CONF))  # Hydra's own help deep-copies its config repository ~100 times (~1 s)
        return
    with exit_codes():
        distributed.init()  # torchrun: join the process group before Hydra composes (see distributed.py)
        from trainer.run.resume import resume_argv

        sys.argv = resume_argv(sys.argv)
        train()
        distributed.end_process()


if __name__ == "__main__":
    main()
