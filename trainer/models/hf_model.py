"""What `model=hf` builds (trainer/models/hf.py): a transformers model wrapped as the framework's models are,
with what generation, checkpoints and the export ask of it."""

import copy
import inspect
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from trainer.core.hooks import ModelHooks
from trainer.text.tokenizers import HF_FOLDER


class Cache:
    """Generation's key/value cache for a causal model: the library's own, and how many positions it holds."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def length(self) -> int:
        return int(self.inner.get_seq_length())


class HFModel(nn.Module, ModelHooks):
    """A transformers model as the framework's models are: `forward(inputs)` gives the logits.

    kind "causal": token ids in, next-token logits for every position out; `forward(ids, cache)` with a
    `new_cache()` continues from the cached positions (generation). "text": padded token ids in (the pad
    id masked out of attention), class logits out. "image": normalised images in, class logits out.
    `saved`, when set, names the parameters checkpoints hold (LoRA's adapters and a new head): the rest
    is the pretrained weights, read again from model.pretrained."""

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        pad_id: int | None = None,
        saved: set[str] | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        self.model, self.kind, self.pad_id, self.saved, self.source = model, kind, pad_id, saved, source
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
        self.config = base.config
        self.cache_argument = (
            "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        )

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.kind == "image":
            return self.model(pixel_values=x).logits
        if self.kind == "text":
            return self.model(input_ids=x, attention_mask=(x != self.pad_id).long()).logits
        if cache is None:
            return self.model(input_ids=x, use_cache=False).logits
        return self.model(input_ids=x, use_cache=True, **{self.cache_argument: cache.inner}).logits

    # ---- generation (causal models) -------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        """The longest context the model's positions reach."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            if isinstance(getattr(self.config, key, None), int):
                return getattr(self.config, key)
        return 2048

    def new_cache(self) -> Cache:
        from transformers import DynamicCache

        try:
            return Cache(DynamicCache(config=self.config))
        except TypeError:  # an older transformers: no config argument
            return Cache(DynamicCache())

    # ---- what the run asks of a model -----------------------------------------------------------------
    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer's layers: the ModuleList as long as the config's layer count."""
        layers = getattr(self.config, "num_hidden_layers", None)
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == layers:
                return list(module)
        return []

    def for_export(self) -> nn.Module:
        """The adapters merged into the base weights (a copy): one plain transformers model."""
        if not hasattr(self.model, "merge_and_unload"):
            return self
        return HFModel(
            copy.deepcopy(self.model).merge_and_unload(), self.kind, self.pad_id, source=self.source
        )

    def export_files(self, folder: Path) -> dict[str, Any]:
        """export/hf: the model as a save_pretrained folder (with LoRA, the merged weights), with the
        run's tokenizer (export/tokenizer's) or the pretrained model's image processor: what
        `from_pretrained` and a pipeline load."""
        model = self.for_export()
        assert isinstance(model, HFModel)
        target = folder / "hf"
        model.model.save_pretrained(str(target))
        if (folder / "tokenizer" / HF_FOLDER).is_dir():
            shutil.copytree(folder / "tokenizer" / HF_FOLDER, target, dirs_exist_ok=True)
        processor = Path(self.source) / "preprocessor_config.json"
        if self.kind == "image" and processor.is_file():
            shutil.copy(processor, target / processor.name)
        return {"saved_pretrained": "hf"}

    # ---- checkpoints: with LoRA, only what trains -------------------------------------------------------
    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.saved is not None:
            for key in [k for k in full if k.startswith(prefix) and k[len(prefix) :] not in self.saved]:
                del full[key]
        return full

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state = state_dict  # torch's name for it: torch.distributed.checkpoint passes it by keyword
        if self.saved is None:
            return super().load_state_dict(state, strict=strict, assign=assign)
        # The trained weights must be there; frozen ones may be too (FSDP's whole-model loading passes
        # every weight, the frozen ones as they are), and are then loaded as well.
        known = set(nn.Module.state_dict(self))
        missing, unexpected = sorted(self.saved - set(state)), sorted(set(state) - known)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for HFModel: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}"
            )
        return super().load_state_dict(
            {k: v for k, v in state.items() if k in known}, strict=False, assign=assign
        )
