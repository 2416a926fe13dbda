"""Inference from a finished run's exports, shared by `python -m trainer.predict` and
`python -m trainer.serve`: load one exported format, turn image files into its input exactly as the
run's evaluation did (the manifest's preprocessing), and answer as the run's task does (the top-k
classes, the labels above a threshold, values in the targets' units, a mask)."""

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trainer.core.cli import import_user_modules
from trainer.core.errors import UserError
from trainer.core.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from trainer.tasks.abilities import Answers, MaskAnswers, NamesTokens

if TYPE_CHECKING:
    from trainer.tasks.base import Task

FORMATS = ("torch_export", "torchscript", "onnx")  # the order a format is picked in when none is named


class InputError(ValueError):
    """An input the model cannot take: not an image, or a tensor of the wrong shape or type."""


def _load(fmt: str, path: Path) -> Callable[[Tensor], Tensor]:
    if fmt == "torch_export":
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        with warnings.catch_warnings():  # deprecated from torch 2.14 on; exported because users ask for it
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning
            )
            return torch.jit.load(str(path)).eval()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


class Predictor:
    def __init__(
        self,
        run_dir: Path,
        fmt: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        limit_key: str = "max_image_pixels",
    ) -> None:
        manifest_path = run_dir / "export" / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(
                f"run: {run_dir} has no export/manifest.json; give the folder of a finished run "
                f"(python -m trainer writes it after training)"
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        usable = [f for f in FORMATS if (self.manifest["formats"].get(f) or {}).get("parity")]
        if fmt is None:
            if not usable:
                raise UserError(
                    f"run: {run_dir} has no exported model that matched its eager model; export it "
                    f"again (export.formats)"
                )
            fmt = usable[0]
        elif fmt not in usable:
            raise UserError(
                f"format: {fmt!r} is not among this run's exports that passed their parity check "
                f"({', '.join(usable) or 'none'})"
            )
        self.format, self.classes = fmt, list(self.manifest["classes"])
        import_user_modules(list(self.manifest.get("imports", [])))  # the run's own task, model...
        self.task: Any = (
            PolicyAnswers() if self.manifest.get("output") == "action" else task_of(self.manifest)
        )
        self.model = _load(fmt, run_dir / "export" / self.manifest["formats"][fmt]["file"])
        self.max_image_pixels, self.limit_key = max_image_pixels, limit_key
        self.input_shape = tuple(self.manifest["input"]["shape"][1:])
        self.max_batch = int(self.manifest["input"].get("max_batch", 1024))
        self.run_dir = run_dir
        spec = self.manifest.get("preprocess")
        self.causal = False
        self.takes_text = spec is not None and spec.get("decode") == "text"
        self.takes_images = spec is not None and not self.takes_text  # neither: tensors only (JSON to serve)
        if self.takes_text:
            from trainer.text.tokenizers import load_tokenizer

            self.tokenizer = load_tokenizer(spec["tokenizer"], run_dir / "export" / "tokenizer")
            self.max_length, self.pad_id = spec["max_length"], spec["pad_id"]
            # No pad token: a causal model (a language model) reads each text's last max_length tokens and
            # is answered at its last one; padding after it cannot change that position's outputs.
            self.causal = self.pad_id is None
            if isinstance(self.task, NamesTokens):
                self.task.use_tokenizer(self.tokenizer)
        elif spec is not None:
            self.channels, self.size = (3 if spec["decode"] == "RGB" else 1), spec["center_crop"][0]
            # The same operations as the run's evaluation transform (arrays.build_transform): the same floats.
            from torchvision.transforms import v2

            self.normalise = v2.Compose(
                [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])]
            )
        # Outputs of the model's shape for one input (zeros; a dynamic length: 2), to check options on.
        dtype = getattr(torch, self.manifest["input"].get("dtype", "float32"))
        self.example_outputs = self.outputs(
            torch.zeros(1, *(2 if n == -1 else n for n in self.input_shape), dtype=dtype)
        )

    def decode(self, data: bytes, expect: str | None = None) -> Tensor:
        """Image file bytes (PNG, JPEG, WebP, GIF; `expect`: the format the sender declared) to one
        normalised input (C, H, W); ImageError (ImageTooLarge past the pixel limit) for anything else."""
        if not self.takes_images:
            raise ImageError(
                "this model takes tensors, not image files (its dataset is not images); send JSON"
            )
        image = decode_image(data, self.size, self.channels, self.max_image_pixels, self.limit_key, expect)
        return self.normalise(image)

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Texts as the model's input: token ids cut to max_length and padded, as in training. A causal
        model's texts keep their last max_length tokens and are padded with -1, which `outputs` reads
        as each text's length (and never gives the model)."""
        ids = torch.full((len(texts), self.max_length), -1 if self.causal else self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.tokenizer.encode(text)
            if self.causal and not tokens:
                raise InputError(f"text {row + 1} is empty; a language model needs a text to continue")
            tokens = tokens[-self.max_length :] if self.causal else tokens[: self.max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids

    def check(self, inputs: Tensor) -> Tensor:
        """A (C, H, W) input or an (N, C, H, W) batch of the shape the model takes, as a batch."""
        if inputs.dtype != torch.float32:
            raise InputError(f"inputs must be float32, got {inputs.dtype}")
        batch = inputs.unsqueeze(0) if inputs.dim() == len(self.input_shape) else inputs
        if batch.dim() != len(self.input_shape) + 1 or tuple(batch.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise InputError(f"inputs must have shape [{shape}] or [N, {shape}], got {list(inputs.shape)}")
        if not bool(batch.isfinite().all()):
            raise InputError("inputs must be finite numbers")
        return batch

    @torch.no_grad()
    def outputs(self, batch: Tensor) -> Tensor:
        """The exported model's outputs for a batch (what `answer` reads); for a causal text model, each
        text's outputs at its last token, as a sequence of one."""
        if not self.causal:
            return self.model(batch).float()
        last = (batch >= 0).sum(dim=1) - 1
        outputs = self.model(batch.clamp(min=0)).float()
        return outputs[torch.arange(len(batch)), last].unsqueeze(1)

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One answer per input, as the run's task gives it (ValueError for an option it cannot take); a
        task without the Answers ability answers its raw outputs."""
        if isinstance(self.task, Answers):
            return self.task.answer(outputs, options)
        return [{"outputs": row.tolist()} for row in outputs.float()]

    @property
    def answers_masks(self) -> bool:
        return isinstance(self.task, MaskAnswers)


class PolicyAnswers(Answers):
    """A reinforcement-learning run's export (recipe=ppo) maps observations to the greedy action."""

    name = "policy"

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{"action": int(action)} for action in outputs.reshape(-1).tolist()]


def task_of(manifest: dict[str, Any]) -> "Task":
    """The run's task, rebuilt from the export manifest."""
    from trainer.core.registry import TASKS

    spec = manifest["task"]
    task = TASKS.build(spec["name"], **spec.get("options", {}))
    task.classes = list(spec.get("classes", manifest.get("classes", [])))
    task.load_state_dict(spec.get("state") or {})
    return task
