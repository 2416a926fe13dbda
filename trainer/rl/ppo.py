"""PPO's parts: the rollout a policy collects, its advantages (GAE), the clipped loss with the
statistics RL users read (entropy, approximate KL, clip fraction, explained variance), and the update
that learns from a rollout. The recipe that runs them is trainer/run/ppo.py."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainer.core import distributed


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


@torch.no_grad()
def collect(
    model: nn.Module, envs: Any, rollout: Rollout, done: Tensor, device: torch.device
) -> tuple[Tensor, list[tuple[float, int]]]:
    """Fills the rollout: every environment takes len(rollout) steps under the policy's sampled actions.
    Returns whether each episode had ended after the last step, and the (return, length) of each
    episode that ended."""
    finished: list[tuple[float, int]] = []
    obs = envs.obs
    for t in range(len(rollout.obs)):
        rollout.obs[t], rollout.dones[t] = obs, done
        on_device = obs.to(device)
        # Logits from a Linear layer are valid by construction: no per-step argument checks.
        dist = torch.distributions.Categorical(logits=model(on_device), validate_args=False)
        action = dist.sample()
        rollout.actions[t], rollout.logprobs[t] = action.cpu(), dist.log_prob(action).cpu()
        rollout.values[t] = model.value(on_device).cpu()
        obs, rollout.rewards[t], ended, episodes = envs.step(action)
        done = ended.float()
        finished += episodes
    return done, finished


def update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rollout: Rollout,
    next_obs: Tensor,
    next_done: Tensor,
    p: Any,
    clip_grad: float,
    device: torch.device,
) -> tuple[dict[str, float], int]:
    """`p.update_epochs` passes over the rollout in shuffled minibatches of the clipped loss; with several
    processes the gradients are averaged before each step. Returns the statistics, averaged over the
    steps and processes (one host sync), and how many optimizer steps were taken."""
    world = distributed.world_size()
    with torch.no_grad():
        next_value = model.value(next_obs.to(device)).cpu()
    adv = advantages(rollout, next_value, next_done, p.gamma, p.gae_lambda)
    batch = rollout.rewards.numel()
    minibatch = batch // p.num_minibatches
    r = rollout
    flat = [x.reshape(batch, *x.shape[2:]).to(device)
            for x in (r.obs, r.actions, r.logprobs, r.values, adv, adv + r.values)]  # fmt: skip
    sums: dict[str, Tensor] = {}
    steps = 0
    for _ in range(p.update_epochs):
        order = torch.randperm(batch, device=device)
        for start in range(0, batch - minibatch + 1, minibatch):
            index = order[start : start + minibatch]
            loss, stats = ppo_loss(
                model, *(x[index] for x in flat), clip=p.clip_coef, clip_vloss=p.clip_vloss,
                norm_adv=p.norm_adv, ent_coef=p.ent_coef, vf_coef=p.vf_coef,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                distributed.average_gradients(model)  # every process steps with the same gradients
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            scheduler.step()
            steps += 1
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value
        if p.target_kl is not None and distributed.mean_over_processes(stats["approx_kl"]) > p.target_kl:
            break  # a deliberate sync, once a pass, where asked; every process agrees
    names = sorted(sums)
    means = distributed.all_reduce(torch.stack([sums[k] for k in names]).cpu()) / (steps * world)
    found = {f"train/{k}": float(v) for k, v in zip(names, means.tolist(), strict=True)}
    found["train/explained_variance"] = distributed.mean_over_processes(
        torch.tensor(explained_variance(flat[3], flat[5]))
    )
    found["lr"] = optimizer.param_groups[0]["lr"]
    return found, steps
