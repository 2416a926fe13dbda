"""Every command in the README and the documentation site runs, shrunk (docs/development.md, "The docs
test", states the rule a writer follows):

- Each ```bash and ```console block runs, line by line, in one folder per page that holds tiny data
  under the names the pages use (`data/`, `my_images/`, `input.txt`, ...: see `world`), unless the line
  before its fence is `<!-- not run: <why> -->`. ```python blocks run as scripts; a ```python or
  ```yaml block whose first line is `# <file>` is written to that file for the commands after it.
- `python -m trainer ...` (and `torchrun ... -m trainer ...`) get SHRINK appended: one epoch of two
  steps, one batch of validation and of test, small batches, no workers; a PPO run of one rollout or
  two. Hydra takes the last value of a key, so these win over the page's own.
- A run dir written `outputs/<date>/<time>` (e.g. `outputs/2026-11-24/10-00-00`) stands for the newest
  run the page made.
- A command fails the test on a non-zero exit or a traceback; a ```console block's lines without `$ `
  must appear in what its command printed.

A key renamed in code breaks this test, not a reader."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import forkrun
import pytest
from conftest import (
    ROOT,
    write_cifar10,
    write_cifar100,
    write_hf_dataset,
    write_imagefolder,
    write_mnist,
    write_segfolder,
)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")
RUN_DIR = re.compile(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d")
SHRINK = [
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.progress_bar=false",
    "loader.batch_size=8",
    "loader.num_workers=0",
    "ppo.num_steps=16",
    "ppo.total_timesteps=64",
    "ppo.eval_episodes=1",
]
# The torchvision datasets' tiny copies cannot match the real files' MD5 sums.
TORCHVISION_DATA = ["dataset.download=false", "dataset.verify_checksum=false"]
MODULES = {
    "trainer",
    "trainer.evaluate",
    "trainer.predict",
    "trainer.generate",
    "trainer.reference",
    "trainer.serve",
    "trainer.data.shard",
    "trainer.data.tokenize",
}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None = None


def blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w+)", lines[i])
        if not fence:
            i += 1
            continue
        indent, start = len(fence.group(1)), i
        i += 1
        body = []
        while not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:])
            i += 1
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = NOT_RUN.search(before)
        found.append(Block(page, start + 1, fence.group(2), "\n".join(body), marker and marker.group(1)))
        i += 1
    return found


def commands(text: str) -> list[list[str]]:
    """A shell block's commands: continuation lines joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            found.append(words[:end])
            words = words[end + 1 :]
    return found


# ---- the folder a page's commands run in -------------------------------------------------------------
def _write_text_corpus(path: Path) -> None:
    import random

    rng = random.Random(0)
    words = "the king and queen of a far land would ride to the sea where old ships lay in the sun".split()
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(600)
    ]
    path.write_text("ROMEO:\n" + "\n".join(lines), encoding="utf-8")


def _write_reviews(root: Path) -> None:
    import json

    good, bad = ["a lovely film", "great fun", "a good movie"], ["the plot was awful", "dull", "a bad film"]
    root.mkdir(parents=True)
    for split, n in (("train", 48), ("val", 12)):
        with (root / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                text, label = (good[i % 3], "positive") if i % 2 else (bad[i % 3], "negative")
                f.write(json.dumps({"text": text, "label": label}) + "\n")


def _write_manifests(world: Path) -> None:
    import csv
    import json

    from PIL import Image

    from trainer.data.synthetic import synthetic_labelled, synthetic_measured

    names = ["cat", "dog", "sky", "sea"]
    for split, seed in (("train", 0), ("val", 1)):
        images, labels = synthetic_labelled(24, 4, 3, 32, 0.15, seed)
        root = world / "my_labels"
        (root / "img").mkdir(parents=True, exist_ok=True)
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "labels"])
            for i, image in enumerate(images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "img" / f"{split}{i}.png")
                writer.writerow([f"img/{split}{i}.png", "|".join(n for n, on in zip(names, labels[i]) if on)])
        images, values = synthetic_measured(24, 3, 32, 0.05, seed)
        root = world / "my_faces"
        (root / "img").mkdir(parents=True, exist_ok=True)
        with (root / f"{split}.jsonl").open("w") as f:
            for i, image in enumerate(images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "img" / f"{split}{i}.jpg")
                f.write(
                    json.dumps({"path": f"img/{split}{i}.jpg", "age": 20 + 40 * float(values[i, 0])}) + "\n"
                )


def _write_arrays(root: Path, labels: str) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split in ("train", "test"):
        np.save(root / f"{split}_images.npy", rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
        values = (
            rng.normal(size=(40, 2)).astype(np.float32) if labels == "values" else rng.integers(0, 10, 40)
        )
        np.save(root / f"{split}_labels.npy", values)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """Tiny data under every name the pages use, in the real on-disk formats; copied for each page."""
    from hf_models import tiny_bert, tiny_gpt2, tiny_vit

    world = tmp_path_factory.mktemp("world")
    data = world / "data"
    write_cifar10(data, per_batch=8)
    write_cifar100(data, n=16)
    write_mnist(data, "MNIST", n=16)
    write_mnist(data, "FashionMNIST", n=16)
    write_imagefolder(world / "my_images", per_class=4, splits=("train", "val", "test"))
    write_imagefolder(world / "my_photos", per_class=6, splits=("train",))  # validation: dataset.val_split
    write_hf_dataset(world / "my_images", data / "my_saved_dataset")
    _write_arrays(world / "my_arrays", "classes")
    _write_arrays(world / "my_measurements", "values")
    _write_text_corpus(world / "input.txt")
    (world / "corpus").mkdir()
    _write_text_corpus(world / "corpus" / "a.txt")
    shutil.copy(world / "input.txt", world / "corpus" / "b.txt")
    _write_reviews(data / "reviews")
    _write_manifests(world)
    write_segfolder(world / "my_masks", per_split=8)
    tiny_gpt2(world / "models" / "gpt2", n_positions=256)
    tiny_bert(
        world / "models" / "bert-base-uncased",
        texts=["a lovely film", "the plot was awful"] * 5,
        max_position_embeddings=128,
    )
    tiny_vit(world / "models" / "vit", image_size=32)
    photos = world / "photos"
    photos.mkdir()
    for i, image in enumerate(sorted((world / "my_images" / "test").rglob("*.png"))):
        shutil.copy(image, photos / f"{i}.png")
    shutil.copy(next((world / "my_images" / "test" / "cat").glob("*.png")), world / "cat.png")
    shutil.copy(next((world / "my_images" / "test" / "dog").glob("*.jpg")), world / "dog.jpg")
    shutil.copy(next((world / "my_masks" / "test" / "images").glob("*.jpg")), world / "street.jpg")
    (world / "reviews.txt").write_text("a lovely film\nthe plot was awful\n")
    return world


# ---- running a page ------------------------------------------------------------------------------------
@dataclass
class Page:
    folder: Path
    runs: int = 0
    sweeps: int = 0
    server: object = None
    port: int = 0
    exports: bool = True  # does a command on the page read an export (predict, serve)?

    def newest_run(self) -> str:
        return f"outputs/docs/run-{self.runs}"


def effective_dataset(args: list[str]) -> str:
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("dataset=")]
    if "recipe=ppo" in args:
        return "none"  # a policy learns from its environment
    if chosen:
        return chosen[-1]
    experiment = [a.split("=", 1)[1] for a in args if a.startswith("experiment=")]
    return "text" if experiment and experiment[-1] == "shakespeare_char" else "cifar10"


def shrink(args: list[str], page: Page) -> list[str]:
    """SHRINK, the data flags tiny copies need, and a run dir of its own (see the module docstring)."""
    if any(a.startswith("--") for a in args):
        return args  # --cfg job, --help: nothing runs
    extra = list(SHRINK)
    if not any(a.startswith("export.formats=") for a in args):
        # tracing costs a second or two a run: only what a command on the page reads (predict, serve)
        extra.append("export.formats=[torch_export]" if page.exports else "export.formats=[]")
    resumed = any(a.startswith("resume=") and a != "resume=auto" for a in args)  # auto may start fresh
    if not resumed and effective_dataset(args) in ("cifar10", "cifar100", "mnist", "fashion_mnist"):
        extra += TORCHVISION_DATA
    if "-m" in args or "--multirun" in args:
        if not any(a.startswith("hydra.sweep.dir=") for a in args):
            page.sweeps += 1
            extra.append(f"hydra.sweep.dir=outputs/docs/sweep-{page.sweeps}")
        if "hparams_search=optuna" in args:
            asked = [int(a.split("=")[1]) for a in args if a.startswith("hydra.sweeper.n_trials=")]
            extra.append(f"hydra.sweeper.n_trials={min(asked[-1], 3) if asked else 2}")
    elif not resumed and not any(a.startswith("hydra.run.dir=") for a in args):
        page.runs += 1
        extra.append(f"hydra.run.dir={page.newest_run()}")
    return [*args, *extra]


def check(result: subprocess.CompletedProcess, block: Block, words: list[str]) -> str:
    output = (result.stdout or "") + (result.stderr or "")
    where = f"{block.page.relative_to(ROOT)}:{block.line}: {shlex.join(words)}"
    assert result.returncode == 0 and "Traceback" not in output, (
        f"{where}\nexit {result.returncode}\n{output[-3000:]}"
    )
    return output


def run_command(words: list[str], block: Block, page: Page, expect_output: bool = False) -> str:
    words = [RUN_DIR.sub(page.newest_run(), w) for w in words]
    where = f"{block.page.relative_to(ROOT)}:{block.line}: {shlex.join(words)}"
    if words[:2] == ["pip", "install"]:
        return ""  # the tests run in the dev environment, which holds every extra the pages install
    if words[0] == "curl":
        assert page.server is not None, (
            f"{where}: a curl line needs `python -m trainer.serve` earlier in its block"
        )
        words = [w.replace("127.0.0.1:8000", f"127.0.0.1:{page.port}") for w in words]
        result = subprocess.run(
            [*words, "-sS", "--fail-with-body"], cwd=page.folder, capture_output=True, text=True, timeout=60
        )
        return check(result, block, words)
    if words[0] == "torchrun":
        module_at = words.index("-m")
        cap = lambda m: f"{m.group(1)}{min(int(m.group(2)), 2)}"  # noqa: E731 - at most two processes
        launcher = [re.sub(r"^(--nproc_per_node=)(\d+)$", cap, w) for w in words[1:module_at]]
        args = shrink(words[module_at + 2 :], page)
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", words[module_at + 1], *args],
            cwd=page.folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return check(result, block, words)
    assert words[:2] == ["python", "-m"] and words[2] in MODULES, (
        f"{where}: not a command the docs test runs; mark its block <!-- not run: <why> -->"
    )
    module, args = words[2], words[3:]
    if module == "trainer":
        args = shrink(args, page)
    if module == "trainer.serve":
        start_server(args, block, page)
        return ""
    result = forkrun.run(module, *args, cwd=page.folder, timeout=300)
    if expect_output:
        return (result.stdout or "") + (result.stderr or "")
    return check(result, block, words)


def start_server(args: list[str], block: Block, page: Page) -> None:
    stop_server(page, block)  # one server at a time, on any free port
    args = [a for a in args if not a.startswith("serve.port=")] + ["serve.port=0"]
    page.server = forkrun.launch("trainer.serve", *args, cwd=page.folder, stdout=subprocess.PIPE)
    line = page.server.stdout.readline()
    match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
    if not match:
        _, err = page.server.communicate(timeout=30)
        pytest.fail(f"{block.page.relative_to(ROOT)}:{block.line}: the server did not start: {line}{err}")
    page.port = int(match.group(1))


def stop_server(page: Page, block: Block) -> None:
    if page.server is None:
        return
    page.server.send_signal(signal.SIGTERM)
    _, err = page.server.communicate(timeout=60)
    assert page.server.returncode == 0 and "Traceback" not in err, (
        f"{block.page.relative_to(ROOT)}:{block.line}: serve: {err[-2000:]}"
    )
    page.server = None


def run_block(block: Block, page: Page) -> None:
    first = block.text.splitlines()[0] if block.text else ""
    named = re.match(r"^# ([\w./-]+\.(py|yaml))$", first)
    if block.lang in ("python", "yaml") and named:
        path = page.folder / named.group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text + "\n")
    elif block.lang == "python":
        script = page.folder / f"_block_{block.line}.py"
        script.write_text(block.text + "\n")
        check(forkrun.run(str(script), cwd=page.folder, timeout=300), block, ["python", script.name])
    elif block.lang == "bash":
        try:
            for words in commands(block.text):
                run_command(words, block, page)
        finally:
            stop_server(page, block)
    elif block.lang == "console":
        lines = block.text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                output = run_command(shlex.split(line[2:]), block, page, expect_output=True)
                after = lines[i + 1 :]
                shown = after[: next((k for k, s in enumerate(after) if s.startswith("$ ")), len(after))]
                for expected in filter(None, (s.strip() for s in shown)):
                    assert expected in output, (
                        f"{block.page.relative_to(ROOT)}:{block.line}: {expected!r} not in:\n{output[-2000:]}"
                    )


RUNNABLE = ("bash", "console", "python", "yaml")


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_command_on_the_page_runs(path, world, tmp_path):
    found = [b for b in blocks(path) if b.lang in RUNNABLE and b.not_run is None]
    if not found:
        pytest.skip("no runnable blocks")
    readers = ("trainer.predict", "trainer.serve")
    exports = any(reader in b.text for b in found if b.lang == "bash" for reader in readers)
    page = Page(tmp_path / "page", exports=exports)
    shutil.copytree(world, page.folder, copy_function=os.link)  # hard links: instant, no space
    for block in found:
        run_block(block, page)


def test_shell_blocks_are_written_as_bash():
    """The docs test runs ```bash and ```console blocks: a shell block fenced otherwise would escape it."""
    for page in PAGES:
        for block in blocks(page):
            if block.lang in ("sh", "shell"):
                pytest.fail(f"{page.relative_to(ROOT)}:{block.line}: write ```bash, so the docs test sees it")


def test_the_parts_table_names_every_registered_entry():
    """Getting started's table of groups names every entry each registry has: one added in code and
    not on the page fails here (the README's sample error once listed five models of ten)."""
    from trainer.core.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULERS, TASKS

    rows = {
        line.split("|")[1].strip(" `"): line
        for line in (ROOT / "docs" / "getting-started.md").read_text().splitlines()
        if line.startswith("| `")
    }
    for registry in (MODELS, DATASETS, TASKS, OPTIMIZERS, SCHEDULERS):
        missing = [name for name in registry.names() if f"`{name}`" not in rows[registry.group]]
        assert not missing, f"docs/getting-started.md: the {registry.group} row lacks {missing}"


def test_the_readme_is_a_front_page_of_at_most_200_lines():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"the README links to {link}, which does not exist"


def test_not_run_blocks_still_use_real_keys():
    """A block the test cannot run (a GPU cluster, a download) is still composed: its `python -m
    trainer` overrides must name groups, entries and keys that exist."""
    from conftest import compose_config

    composed = 0
    for page in PAGES:
        for block in blocks(page):
            if block.lang != "bash" or block.not_run is None:
                continue
            for words in commands(block.text):
                module_at = words.index("-m") if "-m" in words else None
                if (
                    module_at is None
                    or words[module_at + 1] != "trainer"
                    or words[0] == "python"
                    and words[1] != "-m"
                ):
                    continue
                args = [
                    a for a in words[module_at + 2 :] if "=" in a and not a.startswith(("hydra", "resume="))
                ]
                args = [a for a in args if not a.startswith("-") and ("," not in a or "[" in a)]
                if any(a.startswith("resume=") for a in words):
                    continue
                try:
                    compose_config(*args)
                except Exception as error:  # noqa: BLE001 - any failure to compose is the finding
                    pytest.fail(f"{page.relative_to(ROOT)}:{block.line}: {shlex.join(words)}: {error}")
                composed += 1
    assert composed >= 8  # the cluster, multi-GPU and download examples
