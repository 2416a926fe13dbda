"""The policy and value networks of an actor-critic agent (PPO's, trainer/run/ppo.py): two MLPs over the
observation, initialised orthogonally as PPO's reference implementations do (the policy's last layer
small, so the first actions are near uniform). `forward` gives the action logits: what the export runs;
`value` gives the critic's estimate."""

import math
from typing import Annotated

from torch import Tensor, nn

from trainer.core.fields import at_least
from trainer.core.registry import MODELS


def _layer(inputs: int, outputs: int, gain: float) -> nn.Linear:
    layer = nn.Linear(inputs, outputs)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(inputs: int, hidden: list[int], outputs: int, last_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [_layer(inputs, width, math.sqrt(2)), nn.Tanh()]
        inputs = width
    return nn.Sequential(*layers, _layer(inputs, outputs, last_gain))


class ActorCritic(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: list[int]) -> None:
        super().__init__()
        self.actor = _mlp(obs_dim, hidden, n_actions, 0.01)
        self.critic = _mlp(obs_dim, hidden, 1, 1.0)

    def forward(self, obs: Tensor) -> Tensor:
        return self.actor(obs)

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)


class Greedy(nn.Module):
    """The exported policy: observations in, the likeliest action out."""

    def __init__(self, model: ActorCritic) -> None:
        super().__init__()
        self.model = model

    def forward(self, obs: Tensor) -> Tensor:
        return self.model(obs).argmax(-1)


@MODELS.register("actor_critic")
def actor_critic(
    *, obs_dim: Annotated[int, at_least(1)], n_actions: Annotated[int, at_least(2)], hidden: list[int]
) -> ActorCritic:
    """`obs_dim` and `n_actions` come from the environment (env=...)."""
    return ActorCritic(obs_dim, n_actions, list(hidden))
