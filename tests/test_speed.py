"""The speed features: mixed precision, channels_last, torch.compile (warmed up outside the timing),
EMA, flip TTA, the fast recipe, profiling and the per-phase timing table."""

import json
import math
import resource
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_DATA, TINY_RUN, compose_config, run_trainer

from trainer import MODELS, OPTIMIZERS, SCHEDULERS
from trainer.core.checkpoint import load_checkpoint
from trainer.run.compile import warm_up
from trainer.run.ema import WeightAverage
from trainer.run.running import RunningLoss
from trainer.tasks.abilities import FlipAverage

SMALL = [*TINY, "dataset.train_size=512", "export.formats=[torch_export]"]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_bf16_channels_last_ema_and_tta_train_and_export(tmp_path):
    result = run_trainer(
        *SMALL,
        "trainer.precision=bf16",
        "trainer.channels_last=true",
        "ema.decay=0.5",
        "task.tta=flip",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    metrics = _metrics(tmp_path)
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "test/loss"))
    assert metrics["val/acc"] > 0.3 and metrics["train/loss"] < 2.0  # chance: 0.1 and 2.3
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert state["ema"] is not None and state["ema"].keys() == state["model"].keys()
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert (
        manifest["ema"] is True
        and manifest["tta"] == "flip"
        and manifest["formats"]["torch_export"]["parity"]
    )
    # evaluate reproduces the run's test metrics: the EMA weights, under flip TTA
    evaluated = run_trainer(f"run={tmp_path}", module="trainer.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["test/acc"] == metrics["test/acc"]
    log = (tmp_path / "train.log").read_text()
    for phase in ("data wait", "forward+backward", "optimizer", "eval", "checkpoint", "export"):
        assert f"\n{phase}" in log or f"\n  {phase}" in log, phase


def _cannot_compile() -> str | None:
    """Why torch.compile cannot run here (no C++ compiler, an unsupported platform), or None."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as e:
        return f"torch.compile does not work here: {type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def test_compile_warms_up_outside_the_timing_and_saves_plain_weights(tmp_path):
    reason = _cannot_compile()  # checked here, not at collection: it compiles
    if reason:
        pytest.skip(reason)
    result = run_trainer(
        *TINY_DATA,
        *TINY_RUN,
        "model=mlp",
        "model.hidden=[64]",
        "dataset.train_size=256",
        "trainer.compile=true",
        "export.formats=[torch_export]",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    assert _metrics(tmp_path)["val/acc"] > 0.3
    log = (tmp_path / "train.log").read_text()
    table = log[log.index("time per phase") :]
    warm_up = float(table.split("compile warm-up")[1].split()[0])
    train = float(table.split("\ntrain ")[1].split()[0])
    assert warm_up > train  # compiling is slow; had it landed inside the first epoch, images/s would show it


def test_compile_warm_up_covers_the_parameters_that_train_later(tmp_path):
    """model.freeze until epoch 2 (as fastnet's whitening bias stops at its epoch): which parameters
    need gradients changes mid-run, and torch.compile would compile again then, inside training's
    time. The warm-up compiles the last epoch's graphs too."""
    reason = _cannot_compile()
    if reason:
        pytest.skip(reason)
    from conftest import build_recipe
    from conftest import compose_config as compose
    from torch._dynamo.utils import counters

    cfg = compose(
        *TINY_DATA,
        *TINY_RUN,
        "model=mlp",
        "model.hidden=[32]",
        "dataset.train_size=96",
        "loader.batch_size=32",
        "finetune.freeze=[1.*]",
        "finetune.unfreeze_at_epoch=2",
        "trainer.compile=true",
        "logger=csv",
    )
    trainer = build_recipe(cfg, tmp_path).trainer
    warm_up(trainer)
    compiled = sum(counters["stats"].values()), dict(counters["frames"])
    trainer.fit()
    assert (
        sum(counters["stats"].values()),
        dict(counters["frames"]),
    ) == compiled  # nothing compiled while training
    assert trainer.progress.epoch == 2


@pytest.mark.parametrize("case", ["whiten_bias_epochs", "unfreeze_at_epoch"])
def test_several_processes_refuse_what_would_change_the_trained_parameters_mid_run(
    tmp_path, monkeypatch, case
):
    """DDP registers the parameters that need gradients when it wraps the model; one that stops (or
    starts) needing them later is silently left out of the all-reduce (measured with torchrun), so a
    run with several processes is refused before it starts."""
    from conftest import compose_config as compose

    from trainer.core import distributed
    from trainer.core.errors import UserError
    from trainer.run import builders

    refusal = {
        "whiten_bias_epochs": "model=fastnet: it changes which parameters train until epoch 1, which DDP",
        "unfreeze_at_epoch": r"finetune\.unfreeze_at_epoch: with several processes DDP fixes",
    }[case]
    overrides = {
        "whiten_bias_epochs": ["model=fastnet", "model.widths=[8,8,8]", "model.whiten_bias_epochs=1"],
        "unfreeze_at_epoch": [
            "model=mlp",
            "model.hidden=[16]",
            "finetune.freeze=[1.*]",
            "finetune.unfreeze_at_epoch=2",
        ],
    }[case]
    cfg = compose(*TINY_DATA, *TINY_RUN, "dataset.train_size=64", *overrides)
    data = builders.build_data(cfg, torch.device("cpu"))
    model = builders.build_model(cfg, builders.model_args(cfg, data.bundle))
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(UserError, match=rf"^{refusal}"):
        builders.build_freezer(cfg, model, first_epoch=0)  # the recipe's, before DDP would wrap the model


def test_warm_up_restores_weights_statistics_and_random_state(tmp_path):
    from conftest import build_recipe
    from conftest import compose_config as compose

    cfg = compose(*TINY, "model.dropout=0.5")
    trainer = build_recipe(cfg, tmp_path).trainer
    model = trainer.s.model
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    warm_up(trainer)  # eager here: the same steps compiling would run
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # incl. BN statistics
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert "forward+backward" not in trainer.timer.seconds  # the warm-up is not training time


def test_stop_at_ends_training_and_profile_writes_a_trace_beside_the_tensorboard_events(tmp_path):
    result = run_trainer(
        *TINY,
        "trainer.max_epochs=10",
        "trainer.stop_at=0.5",
        "trainer.profile=true",
        "trainer.profile_steps=2",
        "export.formats=[]",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    metrics = _metrics(tmp_path)
    assert metrics["epochs"] < 10 and metrics["val/acc"] >= 0.5
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]["epoch"] == metrics["epochs"]
    traces = list((tmp_path / "tensorboard").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert sum(1 for e in events if str(e.get("name", "")).startswith("ProfilerStep#")) == 2


def test_fast_recipe_composes_and_trains_shrunk(tmp_path):
    cfg = compose_config("experiment=cifar10_fast")
    assert cfg.model.name == "fastnet" and cfg.loader.on_device and cfg.task.tta == "flip_translate"
    assert not cfg.trainer.val_tta  # validation in one pass; the test (and the export) under the TTA
    assert cfg.loader.batch_size == 1024 and cfg.ema.decay > 0 and cfg.ema.lookahead
    assert cfg.process.keep_cpu_memory and cfg.model.whiten_bias_epochs == 3
    assert (
        cfg.trainer.compile == torch.cuda.is_available()
    )  # compiled on a GPU, eager on a CPU (faster there)
    assert compose_config("experiment=cifar10_fast", "trainer.device=cpu").trainer.compile is False
    assert compose_config("experiment=cifar10_fast", "trainer.device=cuda:1").trainer.compile is True
    result = run_trainer(
        "experiment=cifar10_fast",
        "dataset=synthetic",
        "dataset.train_size=768",
        "dataset.test_size=128",
        "model.widths=[16,32,32]",
        "loader.batch_size=64",
        "optimizer.lr=0.4",  # shrunk with the batch: at 1.5 a batch of 64 goes astray
        "trainer.precision=32",
        "trainer.compile=false",
        "trainer.max_epochs=3",
        "trainer.progress_bar=false",
        "export.formats=[torch_export]",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    assert _metrics(tmp_path)["val/acc"] > 0.5
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["formats"]["torch_export"]["parity"]  # the whitening layer and flip TTA export too


def test_whitening_decorrelates_the_patches_it_was_set_from():
    model = MODELS.build("fastnet", num_classes=10, widths=[8, 8, 8])
    images = torch.randn(64, 3, 16, 16) @ torch.randn(16, 16) * 3 + 1  # correlated pixels
    model.init_from_data(images)
    out = model[0](images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # the 12 positive filters
    covariance = torch.cov((out - out.mean(0)).T)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)
    assert not model[0].conv.weight.requires_grad


def test_weight_average_is_an_exponential_moving_average():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.75, every=2)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update(model, step=1)  # not a multiple of every
    assert torch.equal(average.module.weight, start)
    average.update(model, step=2)
    assert torch.allclose(average.module.weight, 0.75 * start + 0.25 * (start + 4.0))


def test_weight_average_decay_grows_with_its_power_and_lookahead_moves_the_model():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.8, every=1, power=3, total_steps=10, lookahead=True)
    assert [average.decay_at(s) for s in (0, 5, 10)] == [0.0, 0.8 * 0.5**3, 0.8]
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update(model, step=5)
    expected = 0.1 * start + 0.9 * (start + 4.0)  # decay 0.1 at half-way
    assert torch.allclose(average.module.weight, expected)
    assert torch.equal(model.weight, average.module.weight)  # lookahead: the model goes on from the average
    watcher = WeightAverage(model, decay=0.8, every=1)  # without: a constant decay, and the model untouched
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    watcher.update(model, step=1)
    assert watcher.decay_at(1) == watcher.decay_at(1000) == 0.8 and torch.equal(model.weight, before + 1.0)


def test_the_whitening_bias_trains_for_its_epochs_only():
    model = MODELS.build("fastnet", num_classes=10, widths=[8, 8, 8], whiten_bias_epochs=2)
    bias = model[0].conv.bias
    x = torch.randn(4, 3, 16, 16)
    for epoch, trains in ((0, True), (1, True), (2, False), (5, False)):
        model.start_epoch(epoch)
        model(x).sum().backward()
        assert bias.requires_grad is trains and (bias.grad is not None) is trains, epoch
        model.zero_grad(set_to_none=True)
    always = MODELS.build("fastnet", num_classes=10, widths=[8, 8, 8])  # 0: the bias always trains
    always.start_epoch(50)
    assert always[0].conv.bias.requires_grad


def test_the_records_recipe_keys_resume_exactly_and_freeze_the_whitening_bias(tmp_path):
    """Lookahead with the growing decay, the whitening bias trained for one epoch, reflect-padded crops:
    killed in the third epoch and resumed, the run ends as the one never interrupted; the bias stays
    as it was after epoch 1, and after the last update the model is the average."""
    from conftest import assert_same_training_state, kill_while_saving

    args = [
        "experiment=cifar10_fast",
        "dataset=synthetic",
        "dataset.train_size=256",
        "dataset.test_size=64",
        "model.widths=[8,16,16]",
        "model.whiten_bias_epochs=1",
        "loader.batch_size=64",
        "trainer.precision=32",
        "trainer.device=cpu",
        "trainer.max_epochs=3",
        "ema.every=2",
        "checkpoint.every_n_steps=4",
        "trainer.progress_bar=false",
        "export.formats=[]",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_trainer(*args, f"hydra.run.dir={straight}").returncode == 0
    kill_while_saving(killed, args, 8)
    after_epoch_1 = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert after_epoch_1["progress"]["step"] == 4
    resumed = run_trainer(*args, f"hydra.run.dir={killed}", f"resume={killed}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(straight, killed)
    final = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert torch.equal(final["model"]["0.conv.bias"], after_epoch_1["model"]["0.conv.bias"])
    assert not torch.equal(
        final["model"]["2.4.weight"], after_epoch_1["model"]["2.4.weight"]
    )  # the rest trained
    assert all(torch.equal(t, final["ema"][k]) for k, t in final["model"].items() if t.is_floating_point())


def _page_faults_of_a_settled_heap() -> int:
    """The median, over 10 steps, of the minor page faults one step takes. The median: now and then one
    step's blocks come from a fresh extension of the heap (glibc's alignment padding) and fault in once
    (measured: 49,152 faults in 10 kept steps, once in three runs), which is not the steady state."""
    source = torch.empty(16 * 2**20).fill_(1)

    def step():  # as a training step makes and drops its activations: blocks of 64 and 32 MiB
        a = source * 2
        b = a + 1
        c = b[: 8 * 2**20] * 3
        del a, b, c

    for _ in range(3):  # the heap settles
        step()
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults)[len(faults) // 2]


def test_keep_cpu_memory_stops_freed_tensors_faulting_in_again():
    import os

    from trainer.run.process import keep_freed_memory

    read, write = os.pipe()
    child = os.fork()  # the allocator setting is the whole process's: a child of this worker takes it
    if child == 0:
        try:
            plain = _page_faults_of_a_settled_heap()
            answer = f"{plain} {_page_faults_of_a_settled_heap()}" if keep_freed_memory() else "not glibc"
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(child, 0)
    if answer == "not glibc":
        pytest.skip("not glibc: process.keep_cpu_memory has nothing to set here")
    plain, kept = map(int, answer.split())
    # every 4 KiB page of the two 64 MiB blocks, every step (the 32 MiB one may come from the heap
    # already: glibc raises its mmap threshold to 32 MiB after the first free; CI measured 32,772)
    assert plain > 30_000
    assert kept < plain / 20  # the blocks come back from the heap, already in memory (measured: 0)


def test_flip_average_is_the_same_for_an_image_and_its_mirror():
    model = MODELS.build("cnn", num_classes=10, width=8).eval()
    x = torch.randn(4, 3, 32, 32)
    tta = FlipAverage(model)
    with torch.no_grad():
        assert torch.equal(tta(x), tta(x.flip(-1)))
        assert torch.allclose(tta(x), (model(x) + model(x.flip(-1))) / 2)


def test_flip_translate_averages_flips_and_one_pixel_shifts_and_exports(tmp_path):
    import torch.nn.functional as F

    from trainer.run.export import export_model
    from trainer.tasks.abilities import FlipTranslateAverage

    torch.manual_seed(0)
    model = MODELS.build("cnn", num_classes=10, width=8).eval()
    x = torch.randn(4, 3, 32, 32)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    flips = FlipAverage(model)
    tta = FlipTranslateAverage(model)
    with torch.no_grad():
        expected = flips(x) / 2 + flips(padded[..., :32, :32]) / 4 + flips(padded[..., 2:, 2:]) / 4
        assert torch.allclose(tta(x), expected, atol=1e-6) and not torch.allclose(tta(x), flips(x), atol=1e-4)
    manifest = export_model(
        tta, x, tmp_path, ["torchscript", "torch_export"], tolerance=1e-4, max_batch=64, metadata={}
    )
    assert all(manifest["formats"][f]["parity"] for f in ("torchscript", "torch_export")), manifest


def test_the_running_loss_names_the_first_nonfinite_step():
    running = RunningLoss(torch.device("cpu"), window=4)
    for step, loss in enumerate([0.5, 0.25, float("nan"), 0.1, float("inf")], start=1):
        running.add(torch.tensor(loss), 2, step=step)
    assert running.first_nonfinite_step() == 3
    healthy = RunningLoss(torch.device("cpu"), window=2)
    healthy.add(torch.tensor(0.5), 2, step=1)
    assert healthy.first_nonfinite_step() is None and healthy.totals() == (1.0, 2)


def test_linear_schedule_and_the_norm_and_bias_learning_rate():
    model = MODELS.build("cnn", num_classes=10, width=8)
    optimizer = OPTIMIZERS.build("sgd", model=model, lr=0.5, norm_and_bias_lr_scale=4.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 2.0]
    schedule = SCHEDULERS.build(
        "linear",
        optimizer=optimizer,
        total_steps=10,
        steps_per_epoch=5,
        warmup_epochs=0.4,
        final_lr_ratio=0.1,
    )
    factors = []
    for _ in range(10):
        factors.append(optimizer.param_groups[0]["lr"] / 0.5)
        optimizer.step()
        schedule.step()
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3]) and factors[2] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(1 - 0.9 * 7 / 8)  # straight down towards 0.1 at step 10
    assert optimizer.param_groups[1]["lr"] == pytest.approx(4 * optimizer.param_groups[0]["lr"])


def test_biases_as_weights_leaves_the_faster_rate_to_the_norm_layers():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    conv, norm, head = model[0], model[1], model[3]

    def groups(**options):
        optimizer = OPTIMIZERS.build(
            "sgd", model=model, lr=0.5, weight_decay=0.01, norm_and_bias_lr_scale=64.0, **options
        )
        return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}

    plain = groups()
    assert plain[id(conv.bias)] == plain[id(head.bias)] == plain[id(norm.bias)] == (32.0, 0.0)
    record = groups(biases_as_weights=True)
    assert record[id(conv.bias)] == record[id(head.bias)] == record[id(conv.weight)] == (0.5, 0.01)
    assert record[id(norm.weight)] == record[id(norm.bias)] == (32.0, 0.0)


def test_validation_every_n_epochs_and_without_tta_while_the_test_keeps_it(tmp_path, monkeypatch):
    """trainer.val_every_n_epochs=2 over 3 epochs validates after epochs 2 and 3 (the last, always), and
    best.pt is chosen among those; trainer.val_tta=false validates the plain model, the test flip-averages."""
    import csv

    from conftest import build_recipe
    from conftest import compose_config as compose

    import trainer.run.loop

    cfg = compose(
        *TINY,
        "trainer.max_epochs=3",
        "trainer.val_every_n_epochs=2",
        "trainer.val_tta=false",
        "task.tta=flip",
        "logger=[csv]",
    )
    evaluated = []
    original = trainer.run.loop.evaluate_model
    monkeypatch.setattr(
        trainer.run.loop,
        "evaluate_model",
        lambda model, *a, **k: evaluated.append(type(model).__name__) or original(model, *a, **k),
    )
    fitted = build_recipe(cfg, tmp_path).trainer
    fitted.fit()
    loaders = fitted.s.loaders
    steps = len(loaders.train)
    with (tmp_path / "metrics.csv").open() as f:
        validated = [int(row["step"]) for row in csv.DictReader(f) if row.get("val/acc")]
    assert validated == [2 * steps, 3 * steps] and fitted.progress.best_epoch in (2, 3)
    fitted.evaluate(loaders.test, None, "test")
    assert evaluated == ["Sequential", "Sequential", "FlipAverage"], evaluated
