"""Reinforcement learning's parts: vectorised environments (the ENVS registry, the `env` config group)
and PPO's rollout storage and loss. The recipe that trains with them is trainer/run/ppo.py."""

from trainer.core.registry import ENVS
from trainer.rl import envs as _builtins  # noqa: F401  (registers the built-in environments)

__all__ = ["ENVS"]
