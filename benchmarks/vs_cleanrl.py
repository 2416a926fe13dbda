"""PPO on CartPole-v1, ours (`python -m trainer recipe=ppo`) against a one-file PPO written here from
CleanRL's published ppo.py hyperparameters (not its code): 4 environments (gymnasium's SyncVectorEnv),
rollouts of 128 steps, GAE (gamma 0.99, lambda 0.95), 4 epochs of 4 minibatches, clip 0.2, entropy 0.01,
value 0.5 (clipped), advantages normalised per minibatch, gradients clipped at 0.5, Adam 2.5e-4 (eps
1e-5) annealed linearly to 0, the same 64-64 tanh actor and critic with orthogonal initialisation. Needs
the `rl` extra.

    python benchmarks/vs_cleanrl.py                         # 500,000 steps each, 3 rounds
    python benchmarks/vs_cleanrl.py --steps 20480 --rounds 1   # the test suite's

Each side runs in a fresh process, the two alternating (which goes first alternating too). Reported:
environment steps per second over the rollouts and updates (evaluation, logging and checkpoints left
out: ours times them apart, and the one-file script has none), and the return after the same steps:
the greedy policy's mean over the same 10 seeded episodes on both sides, and the mean training return
of the last episodes. A JSON line ends the output.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_file_ppo(steps: int, seed: int) -> dict:
    """PPO, written out in one function as a researcher would."""
    import gymnasium as gym
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(torch.get_num_threads())
    n_envs, n_steps, epochs, minibatches = 4, 128, 4, 4
    batch = n_envs * n_steps
    iterations = steps // batch
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(n_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )

    def layer(i: int, o: int, gain: float = 2**0.5) -> nn.Linear:
        lin = nn.Linear(i, o)
        nn.init.orthogonal_(lin.weight, gain)
        nn.init.zeros_(lin.bias)
        return lin

    actor = nn.Sequential(layer(4, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, 2, 0.01))
    critic = nn.Sequential(layer(4, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, 1, 1.0))
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=2.5e-4, eps=1e-5)
    obs_b = torch.zeros(n_steps, n_envs, 4)
    act_b, logp_b, rew_b, done_b, val_b = (torch.zeros(n_steps, n_envs) for _ in range(5))
    obs = torch.tensor(envs.reset(seed=seed)[0], dtype=torch.float32)
    done = torch.zeros(n_envs)
    ep_ret, returns, seconds = np.zeros(n_envs), [], 0.0
    for it in range(iterations):
        started = time.perf_counter()
        optimizer.param_groups[0]["lr"] = 2.5e-4 * (1 - it / iterations)
        with torch.no_grad():
            for t in range(n_steps):
                obs_b[t], done_b[t] = obs, done
                dist = torch.distributions.Categorical(logits=actor(obs))
                action = dist.sample()
                act_b[t], logp_b[t], val_b[t] = action, dist.log_prob(action), critic(obs).squeeze(-1)
                next_obs, reward, term, trunc, _ = envs.step(action.numpy())
                ended = term | trunc
                ep_ret += reward
                returns += ep_ret[ended].tolist()
                ep_ret[ended] = 0
                rew_b[t] = torch.tensor(reward, dtype=torch.float32)
                obs, done = (
                    torch.tensor(next_obs, dtype=torch.float32),
                    torch.tensor(ended, dtype=torch.float32),
                )
            next_value = critic(obs).squeeze(-1)
            adv = torch.zeros_like(rew_b)
            gae = torch.zeros(n_envs)
            for t in reversed(range(n_steps)):
                nonterminal = 1 - (done if t == n_steps - 1 else done_b[t + 1])
                nv = next_value if t == n_steps - 1 else val_b[t + 1]
                delta = rew_b[t] + 0.99 * nv * nonterminal - val_b[t]
                gae = delta + 0.99 * 0.95 * nonterminal * gae
                adv[t] = gae
            ret = adv + val_b
        b_obs, b_act, b_logp = obs_b.reshape(batch, 4), act_b.reshape(batch), logp_b.reshape(batch)
        b_adv, b_ret, b_val = adv.reshape(batch), ret.reshape(batch), val_b.reshape(batch)
        size = batch // minibatches
        for _ in range(epochs):
            perm = torch.randperm(batch)
            for start in range(0, batch, size):
                i = perm[start : start + size]
                dist = torch.distributions.Categorical(logits=actor(b_obs[i]))
                ratio = (dist.log_prob(b_act[i]) - b_logp[i]).exp()
                a = (b_adv[i] - b_adv[i].mean()) / (b_adv[i].std() + 1e-8)
                pg = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()
                v = critic(b_obs[i]).squeeze(-1)
                v_clipped = b_val[i] + (v - b_val[i]).clamp(-0.2, 0.2)
                vl = 0.5 * torch.max((v - b_ret[i]) ** 2, (v_clipped - b_ret[i]) ** 2).mean()
                loss = pg - 0.01 * dist.entropy().mean() + 0.5 * vl
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, 0.5)
                optimizer.step()
        seconds += time.perf_counter() - started
    envs.close()
    # The greedy policy on the episodes ours evaluates on (seed 10,000 + seed + i).
    env, greedy = gym.make("CartPole-v1"), []
    for episode in range(10):
        o, _ = env.reset(seed=10_000 + seed + episode)
        total, finished = 0.0, False
        while not finished:
            with torch.no_grad():
                o, r, term, trunc, _ = env.step(int(actor(torch.tensor(o, dtype=torch.float32)).argmax()))
            total, finished = total + r, term or trunc
        greedy.append(total)
    return {
        "env_steps": iterations * batch,
        "steps_per_sec": iterations * batch / seconds,
        "greedy_return": sum(greedy) / len(greedy),
        "train_return": sum(returns[-20:]) / max(len(returns[-20:]), 1),
    }


def ours(steps: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as run:
        out = subprocess.run(
            [sys.executable, "-m", "trainer", "recipe=ppo", f"ppo.total_timesteps={steps}", f"seed={seed}",
             "export.formats=[]", "logger=[csv]", "trainer.progress_bar=false", "checkpoint.keep_last=1",
             f"hydra.run.dir={run}"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            raise SystemExit(f"error: ours failed:\n{out.stderr[-2000:]}")
        metrics = json.loads((Path(run) / "metrics.json").read_text())
    # test/return is best.pt's; the return after these steps is the last evaluation's (eval/return).
    return {
        "env_steps": metrics["env_steps"],
        "steps_per_sec": metrics["steps_per_sec"],
        "greedy_return": metrics["eval/return"],
        "train_return": metrics.get("train/return", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--side", choices=["one_file"], help=argparse.SUPPRESS)  # a child process's side
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_file_ppo(args.steps, args.seed)))
        return

    def one_file(steps: int, seed: int) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, "--side", "one_file", "--steps", str(steps), "--seed", str(seed)],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            raise SystemExit(f"error: the one-file PPO failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rounds = []
    for r in range(args.rounds):
        sides = [("ours", ours), ("one_file", one_file)]
        found = dict(
            (name, run(args.steps, args.seed)) for name, run in (sides if r % 2 == 0 else sides[::-1])
        )
        found["ratio"] = found["ours"]["steps_per_sec"] / found["one_file"]["steps_per_sec"]
        rounds.append(found)
        a, b = found["ours"], found["one_file"]
        print(
            f"round {r + 1}: ours {a['steps_per_sec']:,.0f} steps/s (greedy return "
            f"{a['greedy_return']:.1f}), one-file {b['steps_per_sec']:,.0f} steps/s "
            f"({b['greedy_return']:.1f}), ratio {found['ratio']:.3f}"
        )
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(
        f"ppo CartPole-v1, {args.steps:,} steps: ours runs at {ratio:.3f}x the one-file PPO's steps/s "
        "(median)"
    )
    print(json.dumps({"benchmark": "vs_cleanrl", "steps": args.steps, "ratio": ratio, "rounds": rounds}))


if __name__ == "__main__":
    main()
