"""`model=hf`: a pretrained Hugging Face `transformers` model (the `hf` extra), fine-tuned whole or through
LoRA adapters (`peft`).

model.pretrained is a folder written by `save_pretrained` or a hub name (through the library's own cache,
HF_HOME). What is built follows the data: a text corpus (dataset=text, task=language_model) gives the
causal language model; labelled texts (dataset=text_classification) a sequence classifier, labelled images
an image classifier, each with its head sized to the dataset's classes (multi-label or regression heads
for task=multilabel and regression). The datasets tokenize with the model's own tokenizer and follow its
image processor's mean, std and size (`${pretrained:...}` in their config files).

With model.lora set, only the adapters (and a classifier's new head) train: checkpoints hold those
weights and their optimizer state, and the export merges the adapters into the base weights. The
export also writes the fine-tuned model as a save_pretrained folder, export/hf, that `from_pretrained`
loads."""

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from trainer.core.errors import UserError, require
from trainer.core.fields import Check, one_of
from trainer.core.hub import transformers_library
from trainer.core.registry import MODELS, PREPROCESSING
from trainer.models.hf_model import HFModel

log = logging.getLogger("trainer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def _lora_ok(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or set(value) - set(LORA_KEYS):
        return False
    targets = value.get("target_modules")
    return (
        isinstance(value.get("r", 8), int)
        and value.get("r", 8) >= 1
        and value.get("alpha", 16) > 0
        and 0 <= value.get("dropout", 0.0) < 1
        and (targets is None or isinstance(targets, (str, list)))
    )


def _source_ok(value: Any) -> bool:
    folder = Path(str(value)).expanduser()
    return not folder.is_dir() or (folder / "config.json").is_file()


Source = Annotated[
    str, Check(_source_ok, "a folder with config.json (what save_pretrained writes) or a hub name (gpt2)")
]
LoRA = Annotated[
    dict | None,
    Check(
        _lora_ok, "null (every weight trains) or {r: 1 or more, alpha: > 0, dropout: [0, 1), target_modules}"
    ),
]
# What is built for each kind of data, and a classifier's problem for each kind of target.
AUTO = {
    "causal": ("AutoModelForCausalLM", "a causal language model"),
    "text": ("AutoModelForSequenceClassification", "a sequence classifier"),
    "image": ("AutoModelForImageClassification", "an image classifier"),
}
PROBLEMS = {
    "class": "single_label_classification",
    "labels": "multi_label_classification",
    "values": "regression",
}


def _kind(target: str, vocab_size: int | None, in_channels: int | None) -> str:
    if target == "tokens":
        return "causal"
    if target in ("class", "labels", "values") and vocab_size is not None:
        return "text"
    if target in ("class", "labels", "values") and in_channels is not None:
        return "image"
    raise UserError(
        f"model=hf: the dataset's targets are {target!r}; model=hf fine-tunes language models (dataset=text) "
        f"and text or image classifiers (dataset=text_classification, imagefolder, ...)"
    )


def _source(pretrained: str) -> str:
    """model.pretrained as the library takes it: a local folder, or a hub name (offline at once when the
    hub cannot be reached)."""
    from trainer.core.hub import offline_unless_reachable

    folder = Path(pretrained).expanduser()
    if not _source_ok(pretrained) or (not folder.is_dir() and pretrained.startswith((".", "/", "~"))):
        raise UserError(
            f"model.pretrained: {folder} is not a folder with config.json; give a folder save_pretrained "
            f"wrote, or a hub name (e.g. gpt2)"
        )
    if folder.is_dir():
        return str(folder)
    offline_unless_reachable()  # no network: the cache at once, not a minute of retries
    return pretrained


def _load(transformers: Any, source: str, kind: str, target: str, dtype: str, attn: str, labels: list):
    """(the model, what the library reported of its loading)."""
    from trainer.core.hub import not_available

    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - offline with an empty cache, an unknown name: one line
        raise not_available("model.pretrained", source, e, "one save_pretrained wrote") from None
    auto, what = AUTO[kind]
    options: dict[str, Any] = {
        "dtype": DTYPES[dtype],
        "attn_implementation": attn,
        "output_loading_info": True,
    }
    if kind != "causal":
        options.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            problem_type=PROBLEMS[target],
            ignore_mismatched_sizes=True,
        )
    try:
        return getattr(transformers, auto).from_pretrained(source, **options)
    except ValueError as e:
        message = str(e).strip().splitlines()[0][:200]
        if "attn" in message.lower() or "attention" in message.lower():
            raise UserError(f"model.attn_implementation: {attn}: {message}; try sdpa or eager") from None
        if "Unrecognized configuration class" in message:
            raise UserError(f"model.pretrained: {config.model_type} models cannot be {what}") from None
        raise


def _keys(found: Any) -> list[str]:
    """Parameter names from the library's loading report (mismatched ones come with their shapes)."""
    return sorted(k if isinstance(k, str) else k[0] for k in found or ())


def _new_modules(info: dict[str, Any]) -> list[str]:
    """The modules the loaded checkpoint did not fill (missing, or resized for this dataset)."""
    keys = _keys(info.get("missing_keys")) + _keys(info.get("mismatched_keys"))
    return sorted({key.rpartition(".")[0] for key in keys if "." in key})


def _said(info: dict[str, Any]) -> str:
    parts = []
    for key, words in (
        ("mismatched_keys", "resized for this dataset"),
        ("missing_keys", "new (trained from scratch)"),
        ("unexpected_keys", "unused"),
    ):
        keys = _keys(info.get(key))
        if keys:
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            parts.append(f"{words}: {', '.join(keys[:4])}{more}")
    return "; ".join(parts)


def _lora(peft: Any, model: nn.Module, kind: str, lora: dict[str, Any], new: list[str]) -> nn.Module:
    """The model with LoRA adapters. What the checkpoint did not hold (a classifier's head, a pooler)
    trains whole: it starts from random weights, where a low-rank change of them would learn little."""
    targets = lora.get("target_modules") or _default_targets(model)
    settings = peft.LoraConfig(
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=targets,
        modules_to_save=new or None,
        task_type=peft.TaskType.CAUSAL_LM if kind == "causal" else None,
    )
    try:
        with warnings.catch_warnings():  # peft's note to itself on GPT-2's Conv1D layers
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
            return peft.get_peft_model(model, settings)
    except ValueError as e:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(
            f"model.lora.target_modules: {lora.get('target_modules') or 'the default'} does not fit "
            f"{type(model).__name__} ({str(e).strip().splitlines()[0][:100]}); its linear layers are "
            f"{', '.join(linear[:8])}"
        ) from None


def _default_targets(model: nn.Module) -> Any:
    """peft's choice for the architecture (GPT-2's c_attn, Llama's q_proj and v_proj); for one it has
    none for (ViT in recent transformers), every linear layer but the output's."""
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as CHOICES
    except ImportError:  # another peft: its own default
        return None
    if model.config.model_type in CHOICES:
        return None
    log.info(
        "model.lora.target_modules: peft has no choice for %s; all linear layers", model.config.model_type
    )
    return "all-linear"


@MODELS.register("hf")
def hf(
    *,
    pretrained: Source,
    dtype: Annotated[str, one_of(*DTYPES)],
    gradient_checkpointing: bool,
    attn_implementation: str,
    lora: LoRA,
    target: str,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    classes: list[str] | None = None,
) -> nn.Module:
    transformers = transformers_library("model=hf")
    kind = _kind(target, vocab_size, in_channels)
    source = _source(pretrained)
    labels = classes or [str(i) for i in range(num_classes or 0)]
    model, info = _load(transformers, source, kind, target, dtype, attn_implementation, labels)
    loaded = _said(info)
    log.info("model.pretrained: %s (%s)%s", source, type(model).__name__, f"; {loaded}" if loaded else "")
    config = model.config
    if kind in ("causal", "text") and vocab_size is not None:
        embeddings = model.get_input_embeddings().num_embeddings
        if vocab_size > embeddings:
            raise UserError(
                f"dataset.tokenizer: its vocabulary has {vocab_size:,} tokens, more than the model's "
                f"{embeddings:,} embeddings; use the model's own tokenizer (leave dataset.tokenizer unset, "
                f"or dataset.tokenizer=hf:{pretrained})"
            )
    channels = getattr(config, "num_channels", in_channels)
    if kind == "image" and in_channels is not None and channels != in_channels:
        raise UserError(
            f"dataset.in_channels: {in_channels}, but {source} takes {config.num_channels}-channel images"
        )
    if kind == "text" and config.pad_token_id is None:
        config.pad_token_id = pad_id  # a decoder's classifier reads the last token before the padding
    config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saved = None
    if lora is not None:
        model = _lora(require("peft", "model.lora", "hf"), model, kind, lora, _new_modules(info))
        saved = {f"model.{name}" for name, p in model.named_parameters() if p.requires_grad}
        _say_lora_sizes(model, saved)
    return HFModel(model, kind, pad_id, saved, source)


def _say_lora_sizes(model: nn.Module, saved: set[str]) -> None:
    params = dict(model.named_parameters())
    trained = sum(p.numel() for n, p in params.items() if f"model.{n}" in saved)
    total = sum(p.numel() for p in params.values())
    size = sum(p.numel() * p.element_size() for n, p in params.items() if f"model.{n}" in saved)
    full = sum(p.numel() * p.element_size() for p in params.values())
    log.info(
        "model.lora: %s of %s parameters train (%.2f%%); checkpoints hold their %s of weights (and their "
        "optimizer state), against %s for every weight",
        f"{trained:,}",
        f"{total:,}",
        100 * trained / max(total, 1),
        _size(size),
        _size(full),
    )


def _size(n: float) -> str:
    scale = min(3, int(math.log(max(n, 1), 1024)))  # bytes, KB, MB or GB
    return f"{n / 1024**scale:,.1f} {('bytes', 'KB', 'MB', 'GB')[scale]}"


def image_processor(model: Any) -> dict:
    """What model.pretrained's image processor does (its mean, std and size), read from its
    preprocessor_config.json (a local folder's, or the hub cache's; nothing is downloaded); and that the
    text datasets tokenize with its tokenizer."""
    source = str(model.get("pretrained"))
    found: dict[str, Any] = {"tokenizer": f"hf:{source}", "vocab_size": None}
    path = Path(source).expanduser() / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "preprocessor_config.json")
        except Exception:  # noqa: BLE001 - not a hub name either: the datasets' own values
            cached = None
        if not isinstance(cached, str):
            return found
        path = Path(cached)
    try:
        processor = json.loads(path.read_text())
    except (OSError, ValueError):
        return found
    size = processor.get("crop_size") or processor.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if isinstance(size, int):
        found["image_size"] = size
    for key, ours in (("image_mean", "mean"), ("image_std", "std")):
        if isinstance(processor.get(key), list):
            found[ours] = [float(v) for v in processor[key]]
    return found


PREPROCESSING["hf"] = image_processor
