"""trainer.strategy=fsdp: two processes on the CPU (gloo) with FSDP2 train what DDP trains; the sharded
checkpoints (torch.distributed.checkpoint) resume bit for bit after a SIGKILL, reshard onto another
number of processes, and fall back past a damaged shard; best.pt and the export are the whole model."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, comparable, kill_while_saving, run_trainer
from test_text import write_corpus

from trainer.core.checkpoint import load_checkpoint


def gpt_args(corpus: Path) -> list[str]:
    """nanoGPT's Shakespeare recipe (experiment=shakespeare_char) shrunk: 2 layers of 32, 15 batches of 8
    windows per process an epoch, an average of the weights, gradients accumulated over 2 batches and
    clipped, a checkpoint every 5 steps; dropout off, so that DDP and FSDP draw nothing different."""
    return [
        "experiment=shakespeare_char",
        f"dataset.root={corpus}",
        f"dataset.cache={corpus.parent / 'cache'}",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.dropout=0.0",
        "dataset.block_size=32",
        "loader.batch_size=8",
        "optimizer.lr=3e-3",
        "trainer.max_epochs=2",
        "trainer.max_steps=-1",
        "trainer.limit_train_batches=15",
        "trainer.limit_val_batches=4",
        "trainer.limit_test_batches=4",
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=0.5",
        "trainer.progress_bar=false",
        "ema.decay=0.9",
        "checkpoint.every_n_steps=5",
    ]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m"]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, "trainer", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def read_sharded(folder: Path) -> dict:
    """A sharded checkpoint folder whole: its model, optimizer and average, with state.pt's progress."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = folder.parent / f"{folder.name}.whole.pt"
    dcp_to_torch_save(folder, whole)
    state = torch.load(whole, weights_only=False)
    whole.unlink()
    return {**state, "progress": load_checkpoint(folder / "state.pt")["progress"]}


def newest_folder(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*.dcp"))[-1]


def assert_equal_tree(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_equal_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    corpus = write_corpus(root / "corpus.txt")
    found = {"corpus": corpus}
    for name, strategy in (("fsdp", "fsdp"), ("ddp", "ddp")):
        result = torchrun(*gpt_args(corpus), f"trainer.strategy={strategy}", f"hydra.run.dir={root / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        found[name] = root / name
    return found


def test_fsdp_writes_sharded_checkpoints_and_a_whole_best_and_export(runs):
    run = runs["fsdp"]
    folders = sorted(p.name for p in (run / "checkpoints").glob("step-*.dcp"))
    assert folders == ["step-000000015-00001.dcp", "step-000000016-00002.dcp"]  # checkpoint.keep_last=2
    assert sorted(os.listdir(run / "checkpoints" / folders[-1])) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "checksums-0.json", "checksums-1.json", "rng-0.pt",
        "rng-1.pt", "state.pt",
    ]  # fmt: skip
    assert not (run / "checkpoints" / "last.pt").exists()
    best = load_checkpoint(run / "checkpoints" / "best.pt")  # the whole model: predict, serve, evaluate
    assert best["model"]["tokens.weight"].shape == (256, 32) and best["optimizer"] is None
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["formats"]["torch_export"]["parity"]
    log = (run / "train.log").read_text()
    assert "x 2 processes" in log and log.count("epoch 2 |") == 1
    generated = run_trainer(f"run={run}", "prompt=The", "max_new_tokens=5", module="trainer.generate")
    assert generated.returncode == 0 and generated.stdout.startswith("The"), generated.stderr
    predicted = run_trainer(f"run={run}", "texts=[The quick]", module="trainer.predict")
    assert predicted.returncode == 0 and "The quick" in predicted.stdout, predicted.stderr
    assert_serves(run)


def assert_serves(run: Path) -> None:
    """trainer.serve's app over the FSDP run's export: a generation streamed to its end."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from trainer.serve import ServeSettings, build_app
    from trainer.serving.predictor import Predictor

    async def ask() -> None:
        async with TestClient(TestServer(build_app(Predictor(run), ServeSettings()))) as client:
            response = await client.post("/v1/generate", json={"prompt": "The", "max_new_tokens": 5})
            assert response.status == 200
            last = json.loads((await response.text()).strip().splitlines()[-1][len("data: ") :])
            assert last == {"done": True, "tokens": 5}

    asyncio.run(ask())


def test_fsdp_trains_what_ddp_trains(runs):
    """The same batches, the same averaged gradients: FSDP reduce-scatters what DDP all-reduces. What
    differs is the order of float32 sums; measured at most 1.2e-7 apart on weights up to 1.0."""
    a, b = (load_checkpoint(runs[name] / "checkpoints" / "best.pt") for name in ("fsdp", "ddp"))
    assert a["progress"]["step"] == b["progress"]["step"] == 16
    for part in ("model", "ema"):
        for key, tensor in a[part].items():
            assert torch.allclose(tensor, b[part][key], atol=1e-5, rtol=0), (part, key)
    ma, mb = (json.loads((runs[name] / "metrics.json").read_text()) for name in ("fsdp", "ddp"))
    assert ma["test/loss"] == pytest.approx(mb["test/loss"], rel=1e-5)
    assert ma["train/loss"] == pytest.approx(mb["train/loss"], rel=1e-5)  # reduced over both processes


def test_sigkill_while_saving_then_resume_is_bit_identical(runs, tmp_path):
    """Every process and torchrun killed while rank 0 writes step 15's checkpoint (inside epoch 2): the
    resumed run continues from step 10 and ends with the uninterrupted run's shards, bit for bit."""
    run = tmp_path / "run"
    kill_while_saving(run, [*gpt_args(runs["corpus"]), "trainer.strategy=fsdp"], 15, launcher=TORCHRUN)
    resumed = torchrun(f"resume={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "resumed at epoch 1, batch 4, step 10" in log
    a, b = read_sharded(newest_folder(run)), read_sharded(newest_folder(runs["fsdp"]))
    pa, pb = comparable(a.pop("progress")), comparable(b.pop("progress"))
    # The epoch's mean training loss is summed in float32 on each process, and a resumed epoch starts
    # rank 0 from the whole job's sum: its last bits may differ (measured 2e-7 relative). Only that.
    assert pa["metrics"].pop("train/loss") == pytest.approx(pb["metrics"].pop("train/loss"), rel=1e-6)
    assert pa == pb
    assert_equal_tree(a, b)


def test_resumes_on_one_process_and_on_two_correctly(runs, tmp_path):
    """2 -> 1 process: DCP reshards; the loss goes on from where it was (a fresh model's is ln 256 = 5.5),
    as it does on 2 processes (the same data in another order: not bit for bit)."""
    losses = {}
    for processes in (1, 2):
        run = tmp_path / str(processes)
        shutil.copytree(runs["fsdp"], run)
        args = (f"resume={run}", "trainer.max_epochs=3")
        result = run_trainer(*args) if processes == 1 else torchrun(*args)
        assert result.returncode == 0, result.stderr[-3000:]
        log = (run / "train.log").read_text()
        assert ("resumed on 1 processes a checkpoint written by 2" in log) == (processes == 1)
        losses[processes] = json.loads((run / "metrics.json").read_text())["train/loss"]
    before = json.loads((runs["fsdp"] / "metrics.json").read_text())["train/loss"]
    assert losses[1] < before and losses[2] < before
    assert losses[1] == pytest.approx(losses[2], rel=0.05)


def test_a_damaged_shard_falls_back_to_the_checkpoint_before_in_one_warning(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    shard = newest_folder(run) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_trainer(f"resume={run}", "trainer.max_epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in (run / "train.log").read_text().splitlines() if "skipped" in line]
    assert len(warnings) == 1 and "corrupt shard __1_0.distcp" in warnings[0], warnings
    assert "resuming from" in warnings[0] and "step-000000015-00001.dcp (step 15)" in warnings[0]


def test_two_nodes_on_this_machine_write_one_run(runs, tmp_path):
    """Two torchrun agents meeting through c10d rendezvous, as two machines would (--nnodes=2)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "-m", "trainer",
        *gpt_args(runs["corpus"]), "trainer.strategy=fsdp", "trainer.max_epochs=1", "export.formats=[]",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    nodes = [subprocess.Popen(agent, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    nodes.append(
        subprocess.Popen(agent, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    )
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "x 2 processes" in log and log.count("epoch 1 |") == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 8


def test_a_submitit_job_of_two_tasks_is_one_run_of_two_processes(runs, tmp_path):
    """hydra.launcher.tasks_per_node=2 (nodes=2 on Slurm): submitit starts the job twice, and the two
    tasks train as one job of two processes, as torchrun's would; rank 0 writes the records."""
    result = run_trainer(
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=5",
        *gpt_args(runs["corpus"]), "trainer.strategy=fsdp", "trainer.max_epochs=1", "export.formats=[]",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "0" / "train.log").read_text()
    assert "x 2 processes" in log and log.count("epoch 1 |") == 1
    assert json.loads((tmp_path / "0" / "job.json").read_text())["status"] == "done"
    ours = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert ours["steps"] == 8 and ours["train/loss"] < 5.6


@pytest.mark.parametrize(
    "args,needle",
    [
        (["trainer.cpu_offload=true"], "trainer.cpu_offload: offloads from a GPU to the CPU"),
        (["model=mlp", "dataset=synthetic", "task=classification", "trainer.activation_checkpointing=true"],
         "trainer.activation_checkpointing: model=mlp declares no blocks"),
        (["model=fastnet", "dataset=synthetic", "task=classification"],
         "trainer.strategy=fsdp: model=fastnet initialises itself from the first batch"),
    ],
)  # fmt: skip
def test_what_fsdp_cannot_do_is_refused_in_one_line(runs, tmp_path, args, needle):
    base = [a for a in gpt_args(runs["corpus"]) if not a.startswith(("experiment", "model.", "dataset"))]
    base += ["dataset.train_size=64", "dataset.test_size=16"]
    if not any(a.startswith("model=") for a in args):
        base = gpt_args(runs["corpus"])
    result = run_trainer(*base, "trainer.strategy=fsdp", *args, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_single_file_checkpoint_resumes_under_fsdp_only_from_its_weights(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["ddp"], run)
    refused = run_trainer(f"resume={run}", "trainer.strategy=fsdp", "trainer.max_epochs=3")
    assert refused.returncode == 2 and "checkpoint.reset_optimizer=true" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    weights_only = run_trainer(
        f"resume={run}", "trainer.strategy=fsdp", "trainer.max_epochs=3", "checkpoint.reset_optimizer=true"
    )
    assert weights_only.returncode == 0, weights_only.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("checkpointed,precision", [(True, "bf16"), (False, "32")])
def test_bf16_gathers_in_bf16_and_activation_checkpointing_recomputes_each_block(checkpointed, precision):
    """trainer.precision=bf16 under fsdp: each block's parameters are gathered in bf16 for its forward,
    while the shards, and the gradients reduced into them, stay fp32 (FSDP's MixedPrecisionPolicy).
    trainer.activation_checkpointing: a block runs again in the backward pass, its activations not
    kept. Against the plain fp32 case without checkpointing."""
    import torch.distributed as dist

    from trainer.models import MODELS
    from trainer.run import sharding

    model = MODELS.build("gpt", vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    seen = []  # the dtype of a block's MLP weight each time the MLP runs
    model.blocks[0].mlp.register_forward_pre_hook(lambda module, args: seen.append(module[0].weight.dtype))
    try:
        if checkpointed:
            sharding.checkpoint_activations(model, "gpt")
        sharding.shard(model, torch.device("cpu"), precision, False, "gpt")  # FSDP over a group of one
        model(torch.randint(256, (2, 16))).float().sum().backward()
        grads, params = {p.grad.dtype for p in model.parameters()}, {p.dtype for p in model.parameters()}
    finally:
        dist.destroy_process_group()
    gathered = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen == [gathered] * (2 if checkpointed else 1)
    assert grads == params == {torch.float32}


def test_fsdp_of_one_process_trains_what_one_process_trains(runs, tmp_path):
    """trainer.strategy=fsdp without torchrun is allowed: FSDP over a group of one (what lets a run
    saved by several processes resume on one)."""
    args = [*gpt_args(runs["corpus"]), "trainer.max_epochs=1", "export.formats=[]", "ema.decay=0"]
    for strategy in ("fsdp", "auto"):
        result = run_trainer(*args, f"trainer.strategy={strategy}", f"hydra.run.dir={tmp_path / strategy}")
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load_checkpoint(tmp_path / s / "checkpoints" / "best.pt")["model"] for s in ("fsdp", "auto"))
    for key, tensor in a.items():
        assert torch.allclose(tensor, b[key], atol=1e-6, rtol=0), key
