"""recipe=ppo: reinforcement learning on the recipe's shape. What a supervised run reads from a dataset,
this one makes itself: each epoch the policy plays `ppo.num_steps` steps in every environment (a
rollout), then learns from it for `ppo.update_epochs` passes of minibatches. The rest is the shared
skeleton (Recipe.run): the resume state read once, the builders, the trackers, stop signals,
checkpoints between rollouts, the best checkpoint by the evaluation return, the export.

    python -m trainer recipe=ppo env=cartpole

The algorithm's parts (the rollout, the advantages, the loss and the update) are trainer/rl/ppo.py;
the environments trainer/rl/envs.py. Here: setup, the epochs, evaluation, checkpoints, the end.
"""

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from trainer.config import params_of
from trainer.core import distributed
from trainer.core.checkpoint import CheckpointWriter, load_checkpoint, rng_state, set_rng_state
from trainer.core.devices import pick_device
from trainer.core.errors import UserError
from trainer.core.registry import ENVS, SCHEDULERS
from trainer.optim import load_optimizer_state
from trainer.rl.envs import play_greedy
from trainer.rl.ppo import Rollout, collect, update
from trainer.run import builders, health
from trainer.run.process import configure_process
from trainer.run.recipe import Recipe
from trainer.run.signals import StopRequested, stop_on_signals
from trainer.run.timing import PhaseTimer

log = logging.getLogger("trainer")


@dataclass
class Progress:
    epoch: int = 0  # rollouts done, each with its updates
    step: int = 0  # optimizer steps
    env_steps: int = 0  # over every environment
    train_time_s: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    recent_returns: list[float] = field(default_factory=list)  # the last finished episodes' returns
    recent_lengths: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class PPO(Recipe):
    envs: Any = None

    def setup(self) -> None:
        cfg, resume, p = self.cfg, self.resume, self.cfg.ppo
        self.device = distributed.device_for(pick_device(cfg.trainer.device))
        configure_process(self.device, cfg.process, str(cfg.trainer.precision))
        # With torchrun each process steps environments of its own: seeded on from the previous ones'.
        env = params_of(cfg.env)
        self.envs = ENVS.build(
            cfg.env.name, seed=cfg.seed + distributed.rank() * env.get("num_envs", 1), **env
        )
        self.batch = self.envs.num_envs * p.num_steps  # this process's rollout
        self.world = distributed.world_size()
        self.iterations = p.total_timesteps // (self.batch * self.world)
        if self.iterations < 1 or self.batch < p.num_minibatches:
            raise UserError(
                f"ppo.total_timesteps: {p.total_timesteps} steps make no rollout of env.num_envs x "
                f"ppo.num_steps = {self.batch} steps cut into {p.num_minibatches} minibatches; raise it"
            )
        model_args = resume.part("model_args") or {
            "name": cfg.model.name, **params_of(cfg.model), "obs_dim": self.envs.obs_dim,
            "n_actions": self.envs.n_actions,
        }  # fmt: skip
        self.model_args = model_args
        self.model = builders.build_model(cfg, model_args, resume.part("model")).to(self.device)
        if self.world > 1:  # the same initial weights everywhere; each process its own actions
            torch.manual_seed(cfg.seed + distributed.rank())
        self.optimizer = builders.build_optimizer(cfg, self.model)
        updates = p.update_epochs * p.num_minibatches
        self.scheduler = SCHEDULERS.build(
            cfg.scheduler.name, optimizer=self.optimizer, total_steps=self.iterations * updates,
            steps_per_epoch=updates, **params_of(cfg.scheduler),
        )  # fmt: skip
        self.progress = Progress(**resume.part("progress", {}))
        self.metric_log = builders.build_metric_log(
            cfg, self.run_dir, resume.part("loggers"), self.progress.env_steps if not resume.fresh else None
        )
        self.timer = PhaseTimer(self.device)
        self.writer = CheckpointWriter(
            self.run_dir / "checkpoints", cfg.checkpoint.keep_last, on_saved=self.metric_log.checkpointed
        )
        self.rollout = Rollout.empty(p.num_steps, self.envs.num_envs, self.envs.obs_dim)
        self.next_done = torch.zeros(self.envs.num_envs)
        if not resume.fresh:
            self.load(resume.state)
        log.info(
            "training ppo on %s (%d environments, %d rollouts of %d steps, %d steps) on %s, run dir %s",
            self.envs.id, self.envs.num_envs, self.iterations, self.batch, self.iterations * self.batch,
            self.device, self.run_dir,
        )  # fmt: skip

    # ---- training ------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, p = self.cfg, self.progress
        with stop_on_signals(self.save_on_stop) as self.stop:
            try:
                while p.epoch < self.iterations:
                    started = time.perf_counter()
                    with self.timer.phase("rollout"):
                        mine = self.collect()
                    finished = [e for each in distributed.gathered(mine) for e in each]  # every process's
                    with self.timer.phase("update"):
                        found = self.update()
                    seconds = time.perf_counter() - started
                    p.epoch, p.env_steps = p.epoch + 1, p.env_steps + self.batch * self.world
                    p.train_time_s += seconds
                    p.recent_returns = (p.recent_returns + [r for r, _ in finished])[-100:]
                    p.recent_lengths = (p.recent_lengths + [n for _, n in finished])[-100:]
                    found |= self.episode_metrics(finished, seconds)
                    if p.epoch % cfg.ppo.eval_every == 0 or p.epoch == self.iterations:
                        with self.timer.phase("eval"):
                            found |= {f"eval/{k}": v for k, v in self.evaluate().items()}
                    p.metrics = found
                    self.metric_log.write(found, step=p.env_steps)
                    self.save_due()
                    if health.stop_agreed(self.stop, self.device, at_check=True):  # every process
                        raise StopRequested(self.stop.signum)
            finally:
                self.writer.wait()

    def collect(self) -> list[tuple[float, int]]:
        """One rollout (trainer/rl/ppo.py); the (return, length) of each episode that ended in it."""
        self.next_done, finished = collect(self.model, self.envs, self.rollout, self.next_done, self.device)
        return finished

    def update(self) -> dict[str, float]:
        """Learn from the rollout (trainer/rl/ppo.py), stepping the optimizer and schedule."""
        found, steps = update(
            self.model, self.optimizer, self.scheduler, self.rollout, self.envs.obs, self.next_done,
            self.cfg.ppo, self.cfg.trainer.gradient_clip_val, self.device,
        )  # fmt: skip
        self.progress.step += steps
        if not all(torch.isfinite(torch.tensor(v)) for k, v in found.items() if "variance" not in k):
            raise UserError(
                f"ppo: the loss became NaN or Inf in rollout {self.progress.epoch + 1}; stopped without "
                f"saving, the last good checkpoint is kept. Lower optimizer.lr"
            )
        return found

    def episode_metrics(self, finished: list[tuple[float, int]], seconds: float) -> dict[str, float]:
        """The mean return and length of the episodes that finished in this rollout (none: the last 100's)."""
        p = self.progress
        returns = [r for r, _ in finished] or p.recent_returns
        lengths = [n for _, n in finished] or p.recent_lengths
        steps_per_sec = self.batch * self.world / max(seconds, 1e-9)
        found = {"epoch": p.epoch, "env_steps": p.env_steps, "steps_per_sec": steps_per_sec}
        if returns:
            found |= {
                "train/return": sum(returns) / len(returns),
                "train/length": sum(lengths) / len(lengths),
            }
        return found

    def evaluate(self) -> dict[str, float]:
        """The greedy policy on the run's seeded evaluation episodes (the same ones every time)."""
        return play_greedy(self.model, self.envs.id, self.cfg.ppo.eval_episodes, self.cfg.seed, self.device)

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from trainer import __version__

        # Each process's own: its random generators and its environments (a collective with torchrun).
        mine = {"rng": rng_state(), "envs": self.envs.state_dict(), "next_done": self.next_done.clone()}
        ranks = distributed.gathered(mine)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "progress": asdict(self.progress),
            "rng": ranks[0]["rng"], "ranks": ranks, "ema": None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model_args": self.model_args, "loggers": self.metric_log.state_dict(), "version": __version__,
        }  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        """A checkpoint's training state; the environments' too where they could be captured."""
        if self.cfg.checkpoint.reset_optimizer:
            log.warning("checkpoint.reset_optimizer: optimizer state (momentum, moments) starts fresh")
        else:
            load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ranks = state["ranks"]
        if len(ranks) != self.world:
            log.warning(
                "resumed on %d processes a run of %d: the policy, optimizer and schedule continue; the "
                "environments start afresh, seeded, and so do the random generators",
                self.world, len(ranks),
            )  # fmt: skip
            return
        mine = ranks[distributed.rank()]
        set_rng_state(mine["rng"])
        if mine["envs"] is not None:
            self.envs.load_state_dict(mine["envs"])
            self.next_done = mine["next_done"].clone()
        else:
            log.warning(
                "resume: %s's state could not be saved; its episodes start afresh from seeded environments",
                self.envs.id,
            )
        log.info("resumed (resume=%s) at rollout %d, %d environment steps", self.resume.source,
                 self.progress.epoch, self.progress.env_steps)  # fmt: skip

    def save_due(self) -> None:
        cfg, p = self.cfg, self.progress
        value = p.metrics.get(self.monitor)
        improved = value is not None and (
            p.best is None or (value > p.best if (cfg.checkpoint.mode or "max") == "max" else value < p.best)
        )
        if improved:
            p.best, p.best_epoch = value, p.epoch
        last = p.epoch % cfg.checkpoint.every_n_epochs == 0 or p.epoch == self.iterations
        if last or improved:
            self.save(last=last, best=improved)

    def save(self, last: bool = True, best: bool = False, wait: bool = False) -> None:
        """Every process gives its part; rank 0 writes."""
        with self.timer.phase("checkpoint"):
            state = self.state_dict()
            if distributed.is_main():
                self.writer.save(state, self.progress.env_steps, last=last, best=best)
                if wait:
                    self.writer.wait()

    def save_on_stop(self, signum: int) -> None:
        import signal

        log.warning("received %s: stopped after rollout %d, saving a checkpoint", signal.Signals(signum).name,
                    self.progress.epoch)  # fmt: skip
        self.save(wait=True)
        log.warning("saved; resume with: python -m trainer resume=%s", self.run_dir)

    # ---- the end -----------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """The best checkpoint's greedy policy, played on the evaluation episodes; exported."""
        from trainer.models.actor_critic import Greedy
        from trainer.run.export import export_model

        best = self.run_dir / "checkpoints" / "best.pt"
        if best.is_file():
            self.model.load_state_dict(load_checkpoint(best)["model"])
        with self.timer.phase("eval"):
            test = {f"test/{k}": v for k, v in self.evaluate().items()}
        formats = list(self.cfg.export.formats)
        if formats and distributed.is_main():  # one writer: two processes writing model.pt2 corrupt it
            with self.timer.phase("export"):
                policy = Greedy(self.model).eval().cpu()
                observations = self.rollout.obs.reshape(self.batch, -1)[:8].clone()
                metadata = {
                    "model": self.cfg.model.name, "checkpoint": "checkpoints/best.pt", "recipe": "ppo",
                    "env": self.envs.id, "output": "action", "classes": [],
                }  # fmt: skip
                export_model(
                    policy, observations, self.run_dir / "export", formats, metadata=metadata,
                    tolerance=self.cfg.export.tolerance, max_batch=self.cfg.export.max_batch,
                )  # fmt: skip
        self.metric_log.write(test, step=self.progress.env_steps)
        return test

    def final_metrics(self, test: dict[str, Any], started: float) -> dict[str, Any]:
        p = self.progress
        scores = "  ".join(f"{k} {v:.1f}" for k, v in test.items())
        best = p.best if p.best is not None else float("nan")
        log.info("%s  (best eval/return %.1f at rollout %d)", scores, best, p.best_epoch)
        log.info("time per phase:\n%s", self.timer.table())
        return {
            **p.metrics, **test, "epochs": p.epoch, "steps": p.step, "env_steps": p.env_steps,
            "steps_per_sec": p.env_steps / max(p.train_time_s, 1e-9), "train_time_s": p.train_time_s,
            "wall_time_s": time.perf_counter() - started,
            "best": {"monitor": self.monitor, "value": p.best, "epoch": p.best_epoch},
        }  # fmt: skip

    def best(self) -> float | None:
        return self.progress.best

    @property
    def monitor(self) -> str:
        return self.cfg.checkpoint.monitor or "eval/return"

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()
