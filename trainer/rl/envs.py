"""Environments, vectorised and seeded, from gymnasium (the `rl` extra): `env=cartpole` is
`env.name=gymnasium env.id=CartPole-v1 env.num_envs=4`.

`VectorEnvs` steps `num_envs` copies in this process (gymnasium's SyncVectorEnv: on a few cores the
environments are cheap next to the network), resetting a finished episode in the same step, and keeps
each episode's return and length. Its whole state can be captured and restored where the environment
is one whose state is plain numbers (gymnasium's classic-control ones: CartPole, Acrobot, MountainCar,
Pendulum), so a run resumed from a checkpoint continues the very episodes it left."""

import logging
from typing import Annotated, Any

import numpy as np
import torch

from trainer.core.errors import UserError
from trainer.core.fields import at_least
from trainer.core.registry import ENVS

log = logging.getLogger("trainer")

# What an environment, and the wrappers gymnasium.make puts around it, hold between steps.
STATE_ATTRIBUTES = ("state", "steps_beyond_terminated", "last_u", "_elapsed_steps", "_has_reset")


class VectorEnvs:
    def __init__(self, env_id: str, num_envs: int, seed: int) -> None:
        try:
            import gymnasium as gym
        except ImportError:
            raise UserError("recipe=ppo: needs gymnasium; pip install -e '.[rl]'") from None

        try:
            spec = gym.spec(env_id)
        except gym.error.Error as e:
            raise UserError(
                f"env.id: {env_id} is not a gymnasium environment ({str(e).splitlines()[0]}); e.g. "
                f"env.id=CartPole-v1"
            ) from None
        self.id = env_id
        self.envs = gym.vector.SyncVectorEnv(
            [lambda: gym.make(spec) for _ in range(num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        space = self.envs.single_action_space
        if not isinstance(space, gym.spaces.Discrete):
            self.envs.close()
            raise UserError(
                f"env.id: {env_id} has {type(space).__name__} actions, and the policy (model=actor_critic) "
                f"chooses among discrete ones; choose an environment with Discrete actions (CartPole-v1, "
                f"Acrobot-v1, LunarLander-v3)"
            )
        self.num_envs, self.n_actions = num_envs, int(space.n)
        self.obs_dim = int(np.prod(self.envs.single_observation_space.shape))
        self.capturable = all(
            type(env.unwrapped).__module__.startswith("gymnasium.envs.classic_control")
            for env in self.envs.envs
        )
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        obs, _ = self.envs.reset(seed=seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32).reshape(num_envs, -1)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple]]:
        """Acts; returns the next observations (a finished episode's first one), the rewards, whether
        each episode ended (terminated or truncated), and the (return, length) of each that ended."""
        obs, rewards, terminated, truncated, _ = self.envs.step(actions.cpu().numpy())
        done = terminated | truncated
        self.returns += rewards
        self.lengths += 1
        finished = [(float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(done)]
        self.returns[done], self.lengths[done] = 0.0, 0
        self.obs = torch.as_tensor(obs, dtype=torch.float32).reshape(self.num_envs, -1)
        return self.obs, torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(done), finished

    def state_dict(self) -> dict[str, Any] | None:
        """Every copy's state, plain values only (None where the environment's cannot be captured)."""
        if not self.capturable:
            return None
        copies = []
        for env in self.envs.envs:
            layers, layer = [], env
            while layer is not None:
                layers.append({k: _plain(getattr(layer, k)) for k in STATE_ATTRIBUTES if k in vars(layer)})
                layer = getattr(layer, "env", None)
            copies.append({"layers": layers, "np_random": env.unwrapped.np_random.bit_generator.state})
        return {"copies": copies, "obs": self.obs.clone(), "returns": self.returns.tolist(),
                "lengths": self.lengths.tolist()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for env, saved in zip(self.envs.envs, state["copies"], strict=True):
            layer = env
            for values in saved["layers"]:
                for key, value in values.items():
                    setattr(layer, key, np.array(value) if isinstance(value, list) else value)
                layer = getattr(layer, "env", None)
            env.unwrapped.np_random.bit_generator.state = saved["np_random"]
        self.obs = state["obs"].clone()
        self.returns, self.lengths = np.array(state["returns"]), np.array(state["lengths"], dtype=np.int64)

    def close(self) -> None:
        self.envs.close()


def _plain(value: Any) -> Any:
    """A numpy array as a list of Python numbers; numpy scalars as Python ones (weights_only-safe)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@ENVS.register("gymnasium")
def gymnasium_envs(*, id: str, num_envs: Annotated[int, at_least(1)], seed: int) -> VectorEnvs:  # noqa: A002
    """`num_envs` copies of the gymnasium environment `id`, seeded from `seed` (copy i: seed + i)."""
    return VectorEnvs(id, num_envs, seed)


@torch.no_grad()
def play_greedy(
    model: torch.nn.Module, env_id: str, episodes: int, seed: int, device: torch.device
) -> dict[str, float]:
    """The mean return and length of `episodes` episodes played with the likeliest action, each in a
    fresh environment seeded from `seed` (episode i: 10,000 + seed + i, apart from training's seeds),
    so that every evaluation of a run plays the same episodes."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns, lengths = [], []
    was_training = model.training
    model.eval()
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=10_000 + seed + episode)
            total, length, done = 0.0, 0, False
            while not done:
                inputs = torch.as_tensor(obs, dtype=torch.float32, device=device).reshape(1, -1)
                obs, reward, terminated, truncated, _ = env.step(int(model(inputs).argmax(-1)))
                total, length, done = total + float(reward), length + 1, terminated or truncated
            returns.append(total)
            lengths.append(length)
    finally:
        env.close()
        model.train(was_training)
    return {"return": sum(returns) / episodes, "length": sum(lengths) / episodes}
