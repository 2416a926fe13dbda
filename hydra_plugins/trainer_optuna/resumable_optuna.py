"""`hparams_search=optuna`: hydra-optuna-sweeper, made resumable (the `sweep` extra).

The study lives in the sweep folder (conf/hparams_search/optuna.yaml), and each trial's folder is named
by its parameters, so running the same command again continues the search: `n_trials` counts every
trial the study holds, not only this invocation's, and a trial that an interrupted search left running
is asked again first, with the same parameters, so its job resumes from its own checkpoint.

Hydra takes sweepers only from the `hydra_plugins` namespace, and imports every module there when it
starts: optuna and the plugin are imported when this sweeper is used, not before.
"""

import logging
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger("trainer")


class ResumableOptunaSweeper(Sweeper):
    """hydra-optuna-sweeper's OptunaSweeper, with the same parameters, continuing its stored study."""

    def __init__(self, **params: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        impl = self.optuna.sweeper
        Path(impl.sweep_dir).mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its folder
        if impl.storage is not None:
            _continue(impl)
        return self.optuna.sweep(arguments)


def _continue(impl: Any) -> None:
    import optuna

    try:
        study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    except KeyError:  # a new study
        return
    state = optuna.trial.TrialState
    interrupted = [t for t in study.trials if t.state == state.RUNNING]
    for trial in interrupted:
        study.tell(trial.number, state=state.FAIL)  # this attempt ended; it is asked again first
        study.enqueue_trial(trial.params)
    finished = sum(t.state in (state.COMPLETE, state.PRUNED, state.FAIL) for t in study.trials) - len(
        interrupted
    )
    impl.n_trials = max(impl.n_trials - finished, 0)
    if finished and hasattr(impl.sampler, "reseed_rng"):
        # The configured seed would draw this search's first points again; a continued search draws anew.
        impl.sampler.reseed_rng()
    log.info(
        "optuna: study %s has %d finished trial(s); %d to go (%d interrupted, asked again first)",
        impl.study_name,
        finished,
        impl.n_trials,
        len(interrupted),
    )
