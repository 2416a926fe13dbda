import math

import pytest
import torch

from trainer import MODELS, OPTIMIZERS, SCHEDULERS
from trainer.core.errors import UserError


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam"])
def test_no_weight_decay_on_norms_and_biases(name):
    model = MODELS.build("cnn", num_classes=10, width=8)
    opt = OPTIMIZERS.build(name, model=model, lr=0.1, weight_decay=0.01)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    everything = OPTIMIZERS.build(name, model=model, lr=0.1, weight_decay=0.01, decay_norm_and_bias=True)
    assert len(everything.param_groups[0]["params"]) == len(list(model.parameters()))


def test_sgd_uses_nesterov_momentum():
    opt = OPTIMIZERS.build("sgd", model=torch.nn.Linear(2, 2), lr=0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def _lrs(name, total=100, per_epoch=10, **params):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = SCHEDULERS.build(name, optimizer=opt, total_steps=total, steps_per_epoch=per_epoch, **params)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_warms_up_linearly_then_decays_to_min():
    lrs = _lrs("cosine", warmup_epochs=1, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_linear_warms_up_from_its_start_ratio_and_ends_at_its_final_ratio():
    plain = _lrs("linear", warmup_epochs=1, final_lr_ratio=0.07)
    assert plain[0] == 1 / 11 and plain[10] == 1.0  # from ~0, as before the key existed
    started = _lrs("linear", warmup_epochs=1, final_lr_ratio=0.07, start_lr_ratio=0.2)
    assert started[0] == pytest.approx(0.2 + 0.8 / 11) and started[9] == pytest.approx(0.2 + 0.8 * 10 / 11)
    assert started[10:] == plain[10:]  # after the warmup, the same straight line down
    assert started[-1] == pytest.approx(0.07 + 0.93 / 90, abs=1e-9)
    with pytest.raises(UserError, match=r"scheduler.start_lr_ratio: must be in \[0, 1\]"):
        _lrs("linear", start_lr_ratio=1.5)


def test_onecycle_peaks_at_pct_start():
    lrs = _lrs("onecycle", pct_start=0.3)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 30
    assert lrs[0] == pytest.approx(1 / 25) and lrs[-1] < 1e-3


def test_step_and_constant():
    lrs = _lrs("step", step_epochs=3, gamma=0.5)
    assert lrs[29] == 1.0 and lrs[30] == 0.5 and lrs[60] == 0.25
    assert set(_lrs("constant")) == {1.0}
    warm = _lrs("constant", warmup_epochs=0.5)
    assert warm[0] == pytest.approx(1 / 6) and warm[5:] == [1.0] * 95
    assert not any(math.isnan(x) for x in warm)


def test_batch_mix_builds_mixup_cutmix_or_nothing():
    from trainer.core.registry import TASKS
    from trainer.tasks.base import DataInfo

    def task(mixup: float, cutmix: float):
        built = TASKS.build("classification", mixup_alpha=mixup, cutmix_alpha=cutmix)
        built.bind(DataInfo(target="class", classes=[str(i) for i in range(10)]))
        return built

    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8)
    assert task(0.0, 0.0).mix((images, labels)) == (images, labels)
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        mix = task(mixup, cutmix).mix
        torch.manual_seed(0)
        mixed, targets = mix((images, labels))
        torch.manual_seed(0)
        again, _ = mix((images, labels))
        assert torch.equal(mixed, again)  # drawn from the global generator, which checkpoints restore
        assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
        assert not torch.equal(mixed, images) and (targets.max(1).values < 1).any()  # pairs really mixed


def test_head_lr_scale_puts_the_last_linear_layer_apart_and_leaves_the_groups_alone_at_1():
    from trainer.optim import param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    plain = param_groups(model, 0.1, False, lr=0.5)
    assert [len(g["params"]) for g in plain] == [2, 2] and [g["lr"] for g in plain] == [0.5, 0.5]
    scaled = param_groups(model, 0.1, False, lr=0.5, head_lr_scale=10)
    head = {id(p) for p in model[2].parameters()}
    rates = {id(p): (g["lr"], g["weight_decay"]) for g in scaled for p in g["params"]}
    assert all(rates[id(p)][0] == (5.0 if id(p) in head else 0.5) for p in model.parameters())
    assert rates[id(model[2].weight)][1] == 0.1 and rates[id(model[2].bias)][1] == 0.0  # decay as before
    with pytest.raises(UserError, match="optimizer.head_lr_scale: Sequential has no classifier head"):
        param_groups(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), 0.1, False, lr=0.5, head_lr_scale=2)


def test_layer_decay_scales_each_block_below_the_head_and_keeps_the_weight_decay_split():
    from trainer.optim import param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    groups = param_groups(model, 0.1, False, lr=1.0, layer_decay=0.5)
    rates = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert [rates[id(p)][0] for p in model.parameters()] == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert [rates[id(p)][1] for p in model.parameters()] == [0.1, 0.0] * 3
    assert groups[0]["lr"] == 1.0  # the groups at lr first: the logged rate is the configured one
    both = param_groups(model, 0.1, False, lr=1.0, layer_decay=0.5, head_lr_scale=10)
    assert {g["lr"] for g in both for p in g["params"] if p is model[4].weight} == {10.0}
    with pytest.raises(UserError, match=r"optimizer.layer_decay: must be in \(0, 1\]"):
        param_groups(model, 0.1, False, lr=1.0, layer_decay=1.5)


def test_layer_decay_on_a_timm_model_follows_timms_own_grouping():
    timm = pytest.importorskip("timm")
    from timm.models import group_parameters

    from trainer.optim import param_groups

    model = timm.create_model("resnet18", num_classes=3)
    groups = param_groups(model, 0.0, False, lr=1.0, layer_decay=0.8)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    deepest = max(layers.values())
    for name, p in model.named_parameters():
        assert rate[id(p)] == pytest.approx(0.8 ** (deepest - layers[name]))
    assert (
        rate[id(model.conv1.weight)]
        < rate[id(model.layer4[1].conv2.weight)]
        < rate[id(model.fc.weight)]
        == 1.0
    )


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_takes_the_fused_kernel_on_a_cpu_and_follows_the_other_to_the_last_bits(name):
    """optimizer.fused=null: torch's fused kernel wherever the parameters allow it (here, a CPU); false:
    one update per tensor. Fifty steps of both from the same start differ by float32 rounding only."""

    def trained(fused):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
        opt = OPTIMIZERS.build(name, model=model, lr=1e-2, weight_decay=0.01, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for _ in range(50):
            model(torch.randn(16, 64, generator=generator)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return opt, torch.cat([p.detach().flatten() for p in model.parameters()])

    (auto, a), (plain, b) = trained(None), trained(False)
    assert auto.defaults["fused"] is True and not plain.defaults["fused"]
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="optimizer.fused: the fused kernel needs floating-point parameters"):
        OPTIMIZERS.build(name, model=torch.nn.Linear(2, 2).to(torch.float64).to("meta"), lr=0.1, fused=True)
