"""`python -m trainer.evaluate run=<run dir> [checkpoint=best|last] [overrides]`: the test metrics of a
finished run, computed with that run's own saved config (overrides such as dataset.root=... apply on top)."""

import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from trainer.config import register_configs, validate
from trainer.core.checkpoint import load_checkpoint
from trainer.core.cli import exit_codes, import_user_modules
from trainer.core.devices import pick_device
from trainer.core.errors import UserError
from trainer.run.builders import build_data, build_model, build_task
from trainer.run.devices import AUTOCAST_DTYPES, evaluate_model
from trainer.run.resume import refuse_older
from trainer.tasks.abilities import TestTimeAugmentation

register_configs()  # the config's resolvers, for the run's saved config


def evaluate_run(run: Path, checkpoint: str, overrides: list[str]) -> dict[str, float]:
    saved = run / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"run: {run} is not a run dir (no .hydra/config.yaml); give a folder under outputs/")
    if checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint: '{checkpoint}' is not one of best, last")
    config = OmegaConf.load(saved)
    refuse_older(OmegaConf.to_container(config), str(run))
    cfg = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
    import_user_modules(list(cfg.imports))
    validate(cfg)
    device = pick_device(cfg.trainer.device)
    state = load_checkpoint(run / "checkpoints" / f"{checkpoint}.pt")
    if cfg.recipe == "ppo":  # a policy: played on the run's seeded evaluation episodes
        from trainer.rl.envs import play_greedy

        model = build_model(cfg, state["model_args"], state["model"]).to(device)
        found = play_greedy(model, cfg.env.id, cfg.ppo.eval_episodes, cfg.seed, device)
        return {**{f"test/{k}": v for k, v in found.items()}, "checkpoint": checkpoint,
                "epoch": state["progress"]["epoch"]}  # fmt: skip
    data = build_data(cfg, device)
    try:
        task = build_task(cfg, data.bundle, state.get("task"))
        # What the run tested: the weights' average when it kept one (the same architecture), under its TTA.
        model = build_model(cfg, state["model_args"], state.get("ema") or state["model"]).to(device)
        if isinstance(task, TestTimeAugmentation):
            model = task.evaluated(model)
        found = evaluate_model(
            model,
            data.loaders.test,
            device,
            AUTOCAST_DTYPES[str(cfg.trainer.precision)],
            task,
            cfg.trainer.limit_test_batches,
        )
    finally:
        data.loaders.close()
    return {
        **{f"test/{k}": v for k, v in found.items()},
        "checkpoint": checkpoint,
        "epoch": state["progress"]["epoch"],
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S"
    )
    with exit_codes():
        args = dict(a.split("=", 1) for a in (argv if argv is not None else sys.argv[1:]) if "=" in a)
        if "run" not in args:
            raise UserError(
                "run: missing; usage: python -m trainer.evaluate run=<run dir> [checkpoint=best|last]"
            )
        run, checkpoint = Path(args.pop("run")), args.pop("checkpoint", "best")
        result = evaluate_run(run, checkpoint, [f"{k}={v}" for k, v in args.items()])
        print(json.dumps(result))


if __name__ == "__main__":
    main()
