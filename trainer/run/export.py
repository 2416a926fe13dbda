"""Export formats and the parity check: each format is written, reloaded, and compared with the
eager model on real inputs of a batch size other than the one used to export it."""

import contextlib
import io
import json
import logging
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.core.atomic import write_text

logger = logging.getLogger("trainer")


def _dynamic(max_batch: int, dims: dict[int, tuple[str, int]]) -> tuple[dict]:
    """torch.export's dynamic shapes for the one input: the batch, and the task's other dimensions."""
    shapes = {0: torch.export.Dim("batch", min=1, max=max_batch)}
    shapes.update({dim: torch.export.Dim(name, min=2, max=most) for dim, (name, most) in dims.items()})
    return (shapes,)


def export_torchscript(
    model: nn.Module, example: Tensor, path: Path, max_batch: int, dims: dict[int, tuple[str, int]]
) -> Callable[[Tensor], Tensor]:
    # TorchScript is deprecated from torch 2.14 on; users still ask for it, so we export it and
    # silence that one warning here, and nowhere else.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        # A traced branch on a shape stays as traced: what these warn of, the parity check below tests
        # (another batch size, and another length where the length is dynamic).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(model, example), str(path))
        return torch.jit.load(str(path))


def export_torch_export(
    model: nn.Module, example: Tensor, path: Path, max_batch: int, dims: dict[int, tuple[str, int]]
) -> Callable[[Tensor], Tensor]:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic(max_batch, dims))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


ONNX_INLINE_LIMIT = 1 << 30


def export_onnx(
    model: nn.Module, example: Tensor, path: Path, max_batch: int, dims: dict[int, tuple[str, int]]
) -> Callable[[Tensor], Tensor]:
    """ONNX through the dynamo exporter, reloaded in onnxruntime (the `onnx` extra)."""
    import onnxruntime

    # One self-contained file, unless the weights pass protobuf's 2 GB limit (then model.onnx.data beside it).
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would land in the run's log
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes=_dynamic(max_batch, dims),
            external_data=weight_bytes > ONNX_INLINE_LIMIT,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


EXPORTERS = {
    "torchscript": ("model.torchscript.pt", export_torchscript),
    "torch_export": ("model.pt2", export_torch_export),
    "onnx": ("model.onnx", export_onnx),
}


def export_model(
    model: nn.Module,
    inputs: Tensor,
    out_dir: Path,
    formats: list[str],
    *,
    tolerance: float,
    max_batch: int,
    metadata: dict[str, Any],
    dims: dict[int, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """Writes each format and export/manifest.json; a format that fails is recorded with its error
    and the others are still written. `inputs` are real, preprocessed test images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Plain contiguous weights on the CPU: what a consumer loads, whatever format training used
    # (torch.export's archive cannot pack channels_last weights).
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    example, check = inputs[:2], inputs[: max(3, min(len(inputs), 8))]  # check at another batch size
    if dims and inputs.ndim > 1 and inputs.shape[1] > 2:
        check = check[:, :-1]  # ...and another length, where the task's other dimensions are dynamic
    with torch.no_grad():
        expected = model(check)
    results: dict[str, Any] = {}
    for fmt in formats:
        filename, exporter = EXPORTERS[fmt]
        try:
            with torch.no_grad():
                loaded = exporter(model, example, out_dir / filename, max_batch, dims or {})
                diff = (loaded(check) - expected).abs().max().item()
            results[fmt] = {"file": filename, "max_abs_diff": diff, "parity": diff <= tolerance}
            if diff > tolerance:
                logger.error(
                    "export %s: output differs from the eager model by %.3g (> export.tolerance %.3g)",
                    fmt,
                    diff,
                    tolerance,
                )
        except Exception as e:  # one format failing must not cost the others
            logger.debug("export %s failed:\n%s", fmt, traceback.format_exc())
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            logger.error("export %s failed: %s", fmt, message)
            for leftover in (out_dir / filename, out_dir / f"{filename}.data"):
                leftover.unlink(missing_ok=True)
            results[fmt] = {"file": None, "error": f"{type(e).__name__}: {message}"}
    manifest = {
        **metadata,
        "formats": results,
        "input": {
            "shape": [-1, *(-1 if i + 1 in (dims or {}) else n for i, n in enumerate(inputs.shape[1:]))],
            "dtype": str(inputs.dtype).removeprefix("torch."),
            "max_batch": max_batch,
        },
        "torch_version": torch.__version__,
    }
    write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def export_run(cfg: Any, state: Any, bundle: Any, run_dir: Path) -> dict[str, Any]:
    """A finished run's export/ folder: the model as tested (its weights' average, under the task's
    test-time augmentation, wrapped as the task exports it), every format of export.formats on real test
    inputs, the files its inputs need (a tokenizer), and manifest.json: what predict and serve read."""
    from trainer.models import ModelHooks
    from trainer.tasks.abilities import ExportWrapper, SequenceInputs, TestTimeAugmentation

    task = state.task
    model = state.evaluated(plain=True)
    if isinstance(task, ExportWrapper):
        model = task.exported(model)
    inputs = task.inputs(next(iter(state.loaders.test)))[:8].cpu()  # real test inputs
    bundle.keep_input_files(run_dir / "export")
    manifest = {
        "model": cfg.model.name,
        "checkpoint": "checkpoints/best.pt",
        "ema": cfg.ema.decay > 0,
        "tta": task.tta if isinstance(task, TestTimeAugmentation) else "none",
        "task": {
            "name": cfg.task.name,
            "options": dict(state.config["task"]),
            "classes": task.classes,
            "state": task.state_dict(),
        },
        "imports": list(cfg.imports),
        "classes": bundle.classes,
        "image_size": bundle.image_size,
        "normalization": {"mean": bundle.mean, "std": bundle.std},
        "preprocess": bundle.preprocessing(),
    }
    manifest["task"]["options"].pop("name", None)
    base = state.ema.module if state.ema is not None else state.plain
    if isinstance(base, ModelHooks):  # what the model adds (a pretrained model's save_pretrained folder)
        manifest.update(base.export_files(run_dir / "export"))
    dims = task.dynamic_dims() if isinstance(task, SequenceInputs) else {}
    return export_model(
        model,
        inputs,
        run_dir / "export",
        list(cfg.export.formats),
        tolerance=cfg.export.tolerance,
        max_batch=cfg.export.max_batch,
        dims=dims,
        metadata=manifest,
    )
