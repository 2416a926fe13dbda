"""Every input a person can get wrong: exit 2 and one plain line that names the key, no traceback.

Most cases call the real entry point, `trainer.__main__.main`, in this process (Hydra composes for real;
it is only the interpreter start that is skipped); two go through a subprocess to pin the exit code
and the stderr a person sees."""

import pytest
from conftest import TINY_DATA, TINY_RUN, refused_in_process, run_trainer, write_cifar10


def _main_exit(monkeypatch, capsys, tmp_path, *args: str) -> tuple[int, str]:
    base = TINY_RUN + (TINY_DATA if not any(a.startswith("dataset=") for a in args) else [])
    return refused_in_process(monkeypatch, capsys, *base, f"hydra.run.dir={tmp_path / 'run'}", *args)


@pytest.mark.parametrize("args,needle", [
    (["model=resnte"], "model=resnte: no such option; choose one of cnn, fastnet, mlp, resnet, torchvision"),
    (["dataset=imagenet"], "dataset=imagenet: no such option"),
    (["optimizer=lamb"], "optimizer=lamb: no such option; choose one of adam, adamw, sgd"),
    (["scheduler=cosin"], "scheduler=cosin: no such option; choose one of constant, cosine, linear, onecycle, step"),
    (["trainer.max_epoch=3"], "trainer.max_epoch"),
    (["model.detph=3"], "model.detph"),
    (["+model.detph=3"], "model.detph: not a parameter of model 'resnet'"),
    (["+trainer.typo_key=3"], "trainer.typo_key: not a key of trainer"),  # `+` slips past the schema
    (["+trainer.max_epoch=3"], "trainer.max_epoch: not a key of trainer (did you mean trainer.max_epochs?)"),
    (["+loader.batchsize=3"], "loader.batchsize: not a key of loader (did you mean loader.batch_size?)"),
    (["+seeds=3"], "seeds: not a key of the config (did you mean seed?)"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs"),
    (["optimizer.lr=fast"], "optimizer.lr: expected float"),
    (["loader.batch_size=-4"], "loader.batch_size: must be 1 or more"),
    (["loader.num_workers=-1"], "loader.num_workers: must be 0"),
    (["trainer.max_epochs=0"], "trainer.max_epochs: must be 1 or more"),
    (["dataset.train_size=0"], "dataset.train_size: must be 1 or more"),
    (["trainer.device=tpu"], "trainer.device: must be one of auto, cpu, cuda, mps, got 'tpu'"),
    (["trainer.precision=16"], "trainer.precision=16"),
    (["model=torchvision", "model.arch=resnet19"], "model.arch: 'resnet19' is not a torchvision"),
    (["imports=[no_such_module]"], "imports: cannot import 'no_such_module'"),
    (["resume=/no/such/run"], "resume: /no/such/run does not exist"),
    (["dataset.augment=[{name: Blur}]"], "dataset.augment: 'Blur'"),
])
def test_bad_input_exits_2_with_one_line(monkeypatch, capsys, tmp_path, args, needle):
    code, err = _main_exit(monkeypatch, capsys, tmp_path, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_missing_data_subprocess(tmp_path):
    result = run_trainer(*TINY_RUN, "dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false",
                         f"hydra.run.dir={tmp_path / 'run'}", fresh=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "dataset=cifar10: no valid data under" in result.stderr and "cifar-10-batches-py" in result.stderr
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert "no valid data" in (tmp_path / "run" / "train.log").read_text()  # and it is in the run's log


def test_composition_error_subprocess(tmp_path):
    result = run_trainer("model=resnte", f"hydra.run.dir={tmp_path / 'run'}", fresh=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "model=resnte" in result.stderr


def test_corrupt_cifar_with_checksums_on(monkeypatch, capsys, tmp_path):
    write_cifar10(tmp_path / "data")
    code, err = _main_exit(monkeypatch, capsys, tmp_path, "dataset=cifar10", f"dataset.root={tmp_path / 'data'}",
                           "dataset.download=false")
    assert code == 2 and "corrupted" in err and "dataset.root" in err
