"""PPO's parts: the rollout a policy collects, its advantages (GAE), and the clipped loss, with the
statistics RL users read (entropy, approximate KL, clip fraction, explained variance)."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Rollout:
    """`steps` steps of `envs` environments, preallocated once: what the policy saw and did."""

    obs: Tensor
    actions: Tensor
    logprobs: Tensor
    rewards: Tensor
    dones: Tensor  # whether the episode had ended before this step's observation (it is a new one)
    values: Tensor

    @classmethod
    def empty(cls, steps: int, envs: int, obs_dim: int) -> "Rollout":
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype)  # noqa: E731
        return cls(zeros(steps, envs, obs_dim), zeros(steps, envs, dtype=torch.long), zeros(steps, envs),
                   zeros(steps, envs), zeros(steps, envs), zeros(steps, envs))  # fmt: skip


def advantages(rollout: Rollout, next_value: Tensor, next_done: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimation, from the last step back: each step's TD error plus the next
    step's advantage discounted by gamma * lambda, cut where an episode ended."""
    steps = len(rollout.rewards)
    found = torch.zeros_like(rollout.rewards)
    running = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        if t == steps - 1:
            alive, later_value = 1.0 - next_done.float(), next_value
        else:
            alive, later_value = 1.0 - rollout.dones[t + 1], rollout.values[t + 1]
        delta = rollout.rewards[t] + gamma * later_value * alive - rollout.values[t]
        running = delta + gamma * lam * alive * running
        found[t] = running
    return found


def ppo_loss(
    model: nn.Module,
    obs: Tensor,
    actions: Tensor,
    old_logprobs: Tensor,
    old_values: Tensor,
    advantage: Tensor,
    returns: Tensor,
    *,
    clip: float,
    clip_vloss: bool,
    norm_adv: bool,
    ent_coef: float,
    vf_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate objective, the (clipped) value loss and the entropy bonus over a minibatch;
    with the statistics as device tensors (no host sync here)."""
    dist = torch.distributions.Categorical(logits=model(obs), validate_args=False)
    logprob, entropy = dist.log_prob(actions), dist.entropy()
    log_ratio = logprob - old_logprobs
    ratio = log_ratio.exp()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()  # the low-variance estimator of KL(old || new)
        clipped = ((ratio - 1.0).abs() > clip).float().mean()
    if norm_adv and len(advantage) > 1:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    policy_loss = torch.max(-advantage * ratio, -advantage * ratio.clamp(1 - clip, 1 + clip)).mean()
    value = model.value(obs)
    if clip_vloss:
        clipped_value = old_values + (value - old_values).clamp(-clip, clip)
        value_loss = 0.5 * torch.max((value - returns) ** 2, (clipped_value - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((value - returns) ** 2).mean()
    entropy_mean = entropy.mean()
    loss = policy_loss - ent_coef * entropy_mean + vf_coef * value_loss
    stats = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
             "entropy": entropy_mean.detach(), "approx_kl": approx_kl, "clip_fraction": clipped}  # fmt: skip
    return loss, stats


def explained_variance(predicted: Tensor, target: Tensor) -> float:
    """1 - Var(target - predicted) / Var(target): how much of the returns the critic explains (1: all)."""
    variance = target.var()
    return float("nan") if variance == 0 else float(1 - (target - predicted).var() / variance)
