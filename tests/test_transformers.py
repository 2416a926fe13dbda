"""model=hf: pretrained Hugging Face transformers models (tiny ones, saved offline by hf_models.py), fine-
tuned whole or through LoRA: a causal LM on a text file (generation, export, exact resume), a BERT-class
classifier on labelled sentences, a ViT on an image folder, and the mistakes a user makes, in one line."""

import json
import random

import pytest
import torch
from conftest import (
    assert_same_training_state,
    build_recipe,
    compose_config,
    kill_while_saving,
    run_trainer,
    write_imagefolder,
)
from hf_models import tiny_bert, tiny_gpt2, tiny_vit

from trainer.core.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

FAST = ["loader.num_workers=0", "trainer.progress_bar=false", "logger=[csv]", "optimizer=adamw"]
GOOD, BAD, FILLER = (
    "good happy movie day".split(),
    "bad sad film rain".split(),
    "the quick brown fox a of".split(),
)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The pretrained folders and the data: a corpus, labelled sentences, an image folder."""
    root = tmp_path_factory.mktemp("transformers")
    rng = random.Random(0)
    # Pretrained on words in random order; fine-tuned on two sentences they make: what LoRA must learn
    # is the order.
    shuffled = [" ".join(rng.choice(GOOD + BAD + FILLER) for _ in range(10)) for _ in range(200)]
    (root / "corpus.txt").write_text("\n".join(["the quick brown fox", "a good movie of a happy day"] * 300))
    sentences = root / "sentences"
    sentences.mkdir()
    for split, n in (("train", 192), ("val", 48)):
        with (sentences / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                label = rng.choice(["pos", "neg"])
                words = [*rng.sample(FILLER, 5), rng.choice(GOOD if label == "pos" else BAD)]
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return {
        "root": root,
        "gpt2": tiny_gpt2(root / "gpt2", shuffled, pretrain_steps=150),
        "bert": tiny_bert(root / "bert"),
        "vit": tiny_vit(root / "vit"),
        "corpus": root / "corpus.txt",
        "sentences": sentences,
        "images": write_imagefolder(root / "images", classes=("dark", "light"), per_class=12),
    }


def lm_args(hf, *extra: str) -> list[str]:
    return [
        "model=hf",
        f"model.pretrained={hf['gpt2']}",
        "dataset=text",
        f"dataset.root={hf['corpus']}",
        f"dataset.cache={hf['root'] / 'tokens'}",
        "dataset.block_size=16",
        "task=language_model",
        "loader.batch_size=8",
        "optimizer.lr=3e-3",
        *FAST,
        *extra,
    ]


def epochs(run_dir) -> list[dict]:
    import csv

    with (run_dir / "metrics.csv").open() as f:
        return [row for row in csv.DictReader(f) if row.get("val/loss")]


def test_lora_fine_tunes_a_causal_lm_whose_base_stays_and_whose_merged_export_matches(hf, tmp_path):
    """Only the adapters train (the pretrained weights are bit for bit those of the folder after three
    epochs); the loss falls; the checkpoint holds the adapters only; the export merges them into the
    weights and answers as the adapted model does, in every format and as a from_pretrained folder."""
    from safetensors.torch import load_file

    cfg = compose_config(*lm_args(hf, "trainer.max_epochs=3", "model.lora.dropout=0", "optimizer.lr=1e-2"))
    recipe = build_recipe(cfg, tmp_path)
    trainer = recipe.trainer
    before = trainer.evaluate(trainer.s.loaders.val, None, "val")["val/loss"]  # the pretrained model's
    recipe.fit()
    recipe.finish()
    model = recipe.trainer.s.plain
    pretrained = load_file(str(hf["gpt2"] / "model.safetensors"))
    base = model.model.get_base_model().state_dict()
    for key, tensor in pretrained.items():  # c_attn's base_layer keeps the pretrained weight under LoRA
        ours = base.get(key, base.get(key.replace("c_attn.", "c_attn.base_layer.")))
        assert torch.equal(ours, tensor), key
    losses = [float(row["val/loss"]) for row in epochs(tmp_path)]
    assert losses[-1] < before - 0.2 and losses[-1] < losses[0], (before, losses)
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert saved and all("lora_" in key for key in saved), list(saved)[:5]
    ids = torch.randint(0, 300, (3, 12))
    with torch.no_grad():
        adapted = model.eval()(ids)
        merged = model.for_export()(ids)
        assert torch.allclose(merged, adapted, atol=1e-5)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "hf")
        assert torch.allclose(reloaded(input_ids=ids).logits, adapted, atol=1e-5)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert all(manifest["formats"][f]["parity"] for f in ("torch_export", "torchscript")), manifest["formats"]
    exported, original = (
        transformers.AutoTokenizer.from_pretrained(f) for f in (tmp_path / "export" / "hf", hf["gpt2"])
    )
    assert exported("the good movie")["input_ids"] == original("the good movie")["input_ids"]


def test_a_format_that_cannot_export_leaves_the_save_pretrained_folder_as_the_export(
    hf, tmp_path, monkeypatch
):
    """Where torch.export cannot take a model, the run says so in one line and ends well: export/hf and
    the checkpoints are the deliverable (a model of ours would exit 1: tested in test_e2e.py)."""
    from trainer.run import export

    def cannot(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setitem(export.EXPORTERS, "torch_export", ("model.pt2", cannot))
    recipe = build_recipe(compose_config(*lm_args(hf, "trainer.max_epochs=1")), tmp_path)
    recipe.fit()
    recipe.finish()
    recipe.after()  # no SystemExit
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert "data-dependent" in manifest["formats"]["torch_export"]["error"]
    assert manifest["saved_pretrained"] == "hf" and (tmp_path / "export" / "hf" / "config.json").is_file()


def test_generate_and_predict_from_a_lora_run(hf, tmp_path):
    """Generation runs the library's key/value cache and gives the tokens the uncached model gives for a
    seed; predict answers the next tokens; the corpus's documents are separated by the end-of-text token."""
    run_dir = tmp_path / "lm"
    result = run_trainer(*lm_args(hf, "trainer.max_epochs=1"), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    texts = []
    for cache in ("true", "false"):
        made = run_trainer(
            f"run={run_dir}", "prompt=the good", "max_new_tokens=24", "seed=1", f"cache={cache}",
            module="trainer.generate",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        texts.append(made.stdout)
    assert texts[0] == texts[1] and texts[0].startswith("the good") and len(texts[0]) > len("the good")
    answered = run_trainer(
        f"run={run_dir}", 'texts=["the quick brown"]', "output=jsonl", module="trainer.predict"
    )
    assert answered.returncode == 0, answered.stderr
    assert len(json.loads(answered.stdout)["next"]) == 5
    index = json.loads(next((hf["root"] / "tokens").glob("*/index.json")).read_text())
    assert index["tokenizer"]["kind"] == "hf" and index["tokenizer"]["eos_id"] is not None


def serve_generation(run_dir, body: dict) -> str:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from trainer.serve import ServeSettings, build_app
    from trainer.serving.predictor import Predictor

    async def ask() -> str:
        async with TestClient(TestServer(build_app(Predictor(run_dir), ServeSettings()))) as client:
            response = await client.post("/v1/generate", json=body)
            assert response.status == 200
            events = [
                json.loads(line[len("data: ") :]) for line in (await response.text()).splitlines() if line
            ]
            return "".join(event.get("text", "") for event in events)

    return asyncio.run(ask())


@pytest.mark.parametrize("lora", ["lora", "full"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(hf, tmp_path, lora):
    args = lm_args(hf, "trainer.max_epochs=2", "export.formats=[]", "checkpoint.every_n_steps=4")
    args += [] if lora == "lora" else ["model.lora=null"]
    straight = run_trainer(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    steps = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["progress"]["step"]
    killed_at = (steps // 2 // 4 + 2) * 4  # a save inside the second epoch
    run_dir = tmp_path / "killed"
    kill_while_saving(run_dir, args, killed_at)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["batches_in_epoch"] > 0
    assert all("lora_" in key for key in saved["model"]) == (lora == "lora")
    resumed = run_trainer(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(run_dir, tmp_path / "straight")


def test_lora_under_fsdp_trains_what_ddp_trains_and_exports_the_merged_model(hf, tmp_path):
    """Two processes: the GPT-2's layers sharded (its repeated_blocks), activations recomputed, only the
    LoRA weights training; the losses are DDP's, and the export is the whole merged model."""
    from test_fsdp import torchrun

    args = lm_args(
        hf, "trainer.max_epochs=2", "trainer.limit_train_batches=10", "export.formats=[torch_export]"
    )
    for strategy in ("fsdp", "ddp"):
        result = torchrun(
            *args, f"trainer.strategy={strategy}", "trainer.activation_checkpointing=true",
            f"hydra.run.dir={tmp_path / strategy}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = (json.loads((tmp_path / s / "metrics.json").read_text()) for s in ("fsdp", "ddp"))
    assert a["test/loss"] == pytest.approx(b["test/loss"], rel=1e-5) and a["steps"] == b["steps"] == 20
    manifest = json.loads((tmp_path / "fsdp" / "export" / "manifest.json").read_text())
    assert manifest["formats"]["torch_export"]["parity"] and manifest["saved_pretrained"] == "hf"
    best = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "best.pt")["model"]
    assert best and all("lora_" in key for key in best)  # the checkpoint holds what trains


def test_a_bert_class_model_learns_labelled_sentences_and_predicts_them(hf, tmp_path):
    """Every weight fine-tuned (model.lora=null; the ViT below trains through LoRA): the sentences' label
    is the one word of mood in them."""
    run_dir = tmp_path / "sentences"
    result = run_trainer(
        "model=hf", f"model.pretrained={hf['bert']}", "model.lora=null", "dataset=text_classification",
        f"dataset.root={hf['sentences']}", "dataset.max_length=16", "trainer.max_epochs=8",
        "optimizer.lr=2e-3", "loader.batch_size=16", *FAST, f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] >= 0.85
    texts = ["the quick good fox", "a brown sad fox"]
    answered = run_trainer(
        f"run={run_dir}", f"texts={json.dumps(texts)}", "output=jsonl", module="trainer.predict"
    )
    assert answered.returncode == 0, answered.stderr
    assert [json.loads(line)["top_k"][0]["class"] for line in answered.stdout.splitlines()] == ["pos", "neg"]
    config = json.loads((run_dir / "export" / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}


def test_a_vit_fine_tunes_on_an_image_folder_with_its_image_processor(hf, tmp_path):
    run_dir = tmp_path / "vit"
    result = run_trainer(
        "model=hf", f"model.pretrained={hf['vit']}", "dataset=imagefolder", f"dataset.root={hf['images']}",
        "dataset.augment=[]", "model.gradient_checkpointing=true", "trainer.max_epochs=4",
        "optimizer.lr=3e-3", "loader.batch_size=8", *FAST,
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] == 1.0
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["preprocess"]["mean"] == [0.5] * 3 and manifest["image_size"] == 16  # the processor's
    assert (run_dir / "export" / "hf" / "preprocessor_config.json").is_file()


def test_mistakes_are_one_line_errors(hf, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    small = tiny_gpt2(tmp_path / "small-vocab", vocab_size=100)
    cases = [
        ([f"model.pretrained={empty}"], "model.pretrained: must be a folder with config.json"),
        (
            ["model.lora.target_modules=[not_a_layer]"],
            "model.lora.target_modules: ['not_a_layer'] does not fit",
        ),
        (["model.lora.rank=4"], "model.lora.rank: not a key of the config"),
        (["model.lora.r=0"], "model.lora: must be null (every weight trains) or {r: 1 or more"),
        (
            [f"model.pretrained={small}"],
            "dataset.tokenizer: its vocabulary has 320 tokens, more than the model's 100",
        ),
    ]
    for extra, message in cases:
        result = run_trainer(*lm_args(hf, *extra), f"hydra.run.dir={tmp_path / 'run'}")
        assert result.returncode == 2, (extra, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert message in last and "Traceback" not in result.stderr, (extra, result.stderr)
    offline = run_trainer(
        *lm_args(hf, "model.pretrained=someone/never-downloaded"),
        f"hydra.run.dir={tmp_path / 'offline'}",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")},
    )
    assert offline.returncode == 2 and "fill the cache" in offline.stderr.splitlines()[-1], offline.stderr
