"""recipe=ppo: PPO learns CartPole through `python -m trainer`, resumes bit for bit after a SIGKILL (the
environments' state included), exports its greedy policy, and refuses bad input in one line."""

import json

import pytest
import torch
from conftest import assert_same_training_state, kill_while_saving, run_trainer

from trainer.core.checkpoint import load_checkpoint

pytest.importorskip("gymnasium")

FAST = ["recipe=ppo", "trainer.progress_bar=false", "logger=[csv]"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    run = tmp_path_factory.mktemp("ppo") / "run"
    result = run_trainer(*FAST, "ppo.total_timesteps=50000", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_ppo_learns_cartpole_within_50_000_steps(learned):
    """PPO's published settings (4 environments, rollouts of 128 steps): the greedy policy of the best
    checkpoint holds the pole for the whole episode. Measured: 500 (the maximum) on this run's 10
    seeded evaluation episodes; a random policy gets ~22."""
    metrics = json.loads((learned / "metrics.json").read_text())
    assert metrics["test/return"] >= 195, metrics
    assert metrics["env_steps"] == 97 * 512 and metrics["epochs"] == 97
    assert metrics["best"]["monitor"] == "eval/return" and metrics["best"]["value"] >= 195
    for key in (
        "train/entropy",
        "train/approx_kl",
        "train/clip_fraction",
        "train/explained_variance",
        "train/policy_loss",
        "train/value_loss",
        "train/return",
        "train/length",
        "steps_per_sec",
    ):
        assert key in metrics, key  # fmt: skip
    logged = (learned / "metrics.csv").read_text().splitlines()
    assert "eval/return" in logged[0] and len(logged) > 97  # every rollout's row, and the evaluations


def test_the_export_is_the_greedy_policy(learned):
    manifest = json.loads((learned / "export" / "manifest.json").read_text())
    assert manifest["formats"]["torch_export"]["parity"] and manifest["input"]["shape"] == [-1, 4]
    policy = torch.export.load(str(learned / "export" / "model.pt2")).module()
    from trainer.models import MODELS

    state = load_checkpoint(learned / "checkpoints" / "best.pt")
    model = MODELS.build("actor_critic", obs_dim=4, n_actions=2, hidden=[64, 64])
    model.load_state_dict(state["model"])
    obs = torch.randn(16, 4)
    with torch.no_grad():
        assert torch.equal(policy(obs), model(obs).argmax(-1))


def test_evaluate_plays_the_runs_evaluation_episodes_again(learned):
    result = run_trainer(f"run={learned}", module="trainer.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again["test/return"] == json.loads((learned / "metrics.json").read_text())["test/return"]


def test_serve_answers_an_action_for_posted_observations(learned):
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from trainer.serve import ServeSettings, build_app
    from trainer.serving.predictor import Predictor

    policy = torch.export.load(str(learned / "export" / "model.pt2")).module()
    obs = [[0.01, -0.2, 0.03, 0.4], [0.0, 0.5, -0.1, -0.3]]
    expected = [{"action": int(a)} for a in policy(torch.tensor(obs))]

    async def ask() -> None:
        async with TestClient(TestServer(build_app(Predictor(learned), ServeSettings()))) as client:
            response = await client.post("/v1/predict", json={"inputs": obs})
            assert response.status == 200
            assert (await response.json())["predictions"] == expected
            wrong = await client.post("/v1/predict", json={"inputs": [[1.0, 2.0]]})
            assert wrong.status == 422 and "[4]" in (await wrong.json())["error"]

    asyncio.run(ask())


def test_sigkill_while_saving_then_resume_is_bit_identical(tmp_path):
    """Killed while writing rollout 20's checkpoint; resumed from rollout 10's, with the environments
    where they were (CartPole's state, the episode counters, their random generators): the end is the
    uninterrupted run's, bit for bit."""
    args = [*FAST, "ppo.total_timesteps=15360", "ppo.eval_every=5", "export.formats=[]"]  # 30 rollouts
    straight = run_trainer(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill_while_saving(tmp_path / "run", args, 20 * 16)  # 16 optimizer steps a rollout
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["epoch"] == 10
    resumed = run_trainer(f"resume={tmp_path / 'run'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed (resume=" in (tmp_path / "run" / "train.log").read_text()
    assert_same_training_state(tmp_path / "run", tmp_path / "straight")
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("run", "straight"))
    ours, theirs = a["ranks"][0], b["ranks"][0]
    assert ours["envs"] is not None and _same(ours["envs"], theirs["envs"])  # CartPole's state, captured
    assert torch.equal(ours["next_done"], theirs["next_done"])
    assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])  # what the actions are sampled from


def test_two_processes_killed_while_saving_resume_each_its_environments_bit_for_bit(tmp_path):
    """torchrun, 2 processes of 2 environments: rank 0's checkpoint holds both processes' environments
    and random generators; after a SIGKILL of every process the pair resumes as if never stopped."""
    import subprocess
    import sys

    from conftest import ROOT

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m"]
    args = [*FAST, "env.num_envs=2", "ppo.total_timesteps=15360", "ppo.eval_every=5", "export.formats=[]"]
    straight = subprocess.run([*torchrun, "trainer", *args, f"hydra.run.dir={tmp_path / 'straight'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill_while_saving(tmp_path / "run", args, 20 * 16, launcher=torchrun)
    resumed = subprocess.run([*torchrun, "trainer", f"resume={tmp_path / 'run'}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(tmp_path / "run", tmp_path / "straight")
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["ranks"] for r in ("run", "straight"))
    assert len(a) == 2 and all(_same(x["envs"], y["envs"]) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x["rng"]["torch"], y["rng"]["torch"]) for x, y in zip(a, b, strict=True))


def test_an_environment_whose_state_cannot_be_saved_restarts_its_episodes_and_says_so(tmp_path):
    """FrozenLake (gymnasium's toy text) is not one whose state the checkpoint captures: the resumed run
    continues the policy and starts fresh seeded episodes, in one warning line."""
    args = [
        *FAST,
        "env.id=FrozenLake-v1",
        "ppo.total_timesteps=2048",
        "ppo.eval_every=2",
        "export.formats=[]",
    ]
    first = run_trainer(*args, f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["ranks"][0]["envs"] is None
    resumed = run_trainer(f"resume={tmp_path}", "ppo.total_timesteps=4096")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in (tmp_path / "train.log").read_text().splitlines() if "start afresh" in line]
    assert len(warnings) == 1 and "FrozenLake-v1's state could not be saved" in warnings[0]
    assert json.loads((tmp_path / "metrics.json").read_text())["env_steps"] == 4096


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_two_processes_with_half_the_environments_each_learn_as_one_does(learned, tmp_path):
    """torchrun: 2 processes of 2 environments each (seeded on from each other: seeds 42-45, the one
    process's 4), gradients averaged before each step. Not the same numbers as one process (its
    minibatches mix all 4 environments' steps; here each process's mixes its own 2), so the same
    behaviour is what is checked: the same steps, and the policy learns the task as well."""
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "trainer", *FAST,
         "env.num_envs=2", "ppo.total_timesteps=50000", "export.formats=[torch_export]",
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pair, one = (json.loads((run / "metrics.json").read_text()) for run in (tmp_path, learned))
    assert pair["env_steps"] == one["env_steps"] and pair["epochs"] == one["epochs"]
    assert pair["test/return"] >= 195 and one["test/return"] >= 195
    log = (tmp_path / "train.log").read_text()
    assert log.count("epoch 97 |") == 1  # rank 0 logs, for both
    # rank 0 alone exports (two writers of one model.pt2 corrupted it)
    assert "failed" not in result.stderr and torch.export.load(tmp_path / "export" / "model.pt2")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["env.id=CartPoel-v1"], "env.id: CartPoel-v1 is not a gymnasium environment"),
        (["env.id=Pendulum-v1"], "env.id: Pendulum-v1 has Box actions"),
        (["env.num_envs=0"], "env.num_envs: must be 1 or more, got 0"),
        (["ppo.total_timesteps=100"], "ppo.total_timesteps: 100 steps make no rollout"),
    ],
)
def test_bad_input_is_refused_in_one_line(tmp_path, args, needle):
    result = run_trainer(*FAST, *args, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
