"""`python -m trainer.predict run=<run dir> inputs=[a.png,folder/] [format=torch_export] [topk=5]
[output=table]`: what a finished run's exported model says about image files, preprocessed as the
run's evaluation was, answered as its task answers (the top-k classes, the labels above
task.threshold, values in the targets' units, per-class pixel counts and, with masks=<folder>, mask
PNGs). A table by default; `output=jsonl` prints one JSON object per image."""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, OmegaConf

from trainer.core.atomic import write_bytes
from trainer.core.cli import exit_codes
from trainer.core.errors import UserError
from trainer.core.images import DEFAULT_MAX_PIXELS, SUFFIXES, ImageError
from trainer.serving.predictor import InputError, Predictor


@dataclass
class PredictConfig:
    run: str = MISSING
    inputs: list[str] = field(default_factory=list)  # image files and folders (searched recursively); text
    # models: .txt files, a text per line
    texts: list[str] = field(default_factory=list)  # text models: texts given on the command line
    format: Optional[str] = None  # torch_export, torchscript or onnx; default: the first that passed parity
    topk: int = 5  # classification: how many classes per image
    threshold: Optional[float] = (
        None  # multilabel: the score a label needs (default: the run's task.threshold)
    )
    masks: Optional[str] = None  # segmentation: a folder to write each image's mask to, as <name>.png
    output: str = "table"  # table or jsonl
    batch_size: int = 64
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # a larger image gets an error row (checked before decoding)


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"inputs: {item} does not exist; give image files or folders")
    if not files:
        raise UserError(
            f"inputs: no .jpg, .png, .webp or .gif images in {', '.join(inputs) or 'the empty list'}; "
            f"e.g. inputs=[cat.png,photos/]"
        )
    return files


def predict(cfg: PredictConfig) -> list[dict]:
    for key in ("topk", "batch_size", "max_image_pixels"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}: must be 1 or more, got {getattr(cfg, key)}")
    if cfg.output not in ("table", "jsonl"):
        raise UserError(f"output: must be table or jsonl, got {cfg.output!r}")
    predictor = Predictor(Path(cfg.run), cfg.format, cfg.max_image_pixels)
    options = {"topk": cfg.topk, "threshold": cfg.threshold}
    try:
        predictor.answer(predictor.example_outputs, options)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.masks is not None and not predictor.answers_masks:
        raise UserError(
            f"masks: task={predictor.task.name} answers no masks; masks= is for segmentation runs"
        )
    if predictor.takes_text:
        return predict_texts(predictor, cfg, options)
    files, results = image_files(list(cfg.inputs)), []
    for first in range(0, len(files), cfg.batch_size):
        batch, names = [], []
        for path in files[first : first + cfg.batch_size]:
            try:
                batch.append(predictor.decode(path.read_bytes()))
                names.append(path)
            except (ImageError, OSError) as e:
                results.append({"image": str(path), "error": str(e)})
        if batch:
            outputs = predictor.outputs(torch.stack(batch))
            answers = predictor.answer(outputs, options)
            if cfg.masks is not None:
                folder = Path(cfg.masks)
                folder.mkdir(parents=True, exist_ok=True)
                for path, png, answer in zip(names, predictor.task.png(outputs), answers):
                    answer["mask"] = str(folder / f"{path.stem}.png")
                    write_bytes(Path(answer["mask"]), png)
            results += [{"image": str(p), **a} for p, a in zip(names, answers)]
    return results


def predict_texts(predictor: Predictor, cfg: PredictConfig, options: dict) -> list[dict]:
    """A text model's answers: each of `texts`, and each non-empty line of the `inputs` files."""
    texts = list(cfg.texts)
    for item in cfg.inputs:
        path = Path(item)
        if not path.is_file():
            raise UserError(
                f"inputs: {item} is not a file; give .txt files with a text per line, or texts=[...]"
            )
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError('texts: this run takes text; give texts=["..."] or inputs=[file.txt]')
    results = []
    for first in range(0, len(texts), cfg.batch_size):
        batch = texts[first : first + cfg.batch_size]
        try:
            inputs = predictor.encode_texts(batch)
        except InputError as e:
            raise UserError(f"texts: {e}") from None
        answers = predictor.answer(predictor.outputs(inputs), options)
        results += [{"text": text, **answer} for text, answer in zip(batch, answers)]
    return results


def show_table(results: list[dict], k: int) -> str:
    # a text model's rows name their text, shortened, where image rows name the file
    names = [r["image"] if "image" in r else r.get("text", "")[:40] for r in results]
    width = max(len(name) for name in names)
    if any("top_k" in r for r in results):  # classification: a column per rank the answers have
        ranks = min(k, max(len(r["top_k"]) for r in results if "top_k" in r))
        header = "  ".join(f"{f'top-{i + 1}':<22}" for i in range(ranks))
    else:
        header = "answer"
    rows = [f"{'image' if any('image' in r for r in results) else 'text':<{width}}  {header}"]
    for name, r in zip(names, results):
        rows.append(f"{name:<{width}}  " + (f"error: {r['error']}" if "error" in r else _cells(r)))
    return "\n".join(rows)


def _cells(row: dict) -> str:
    if "top_k" in row:
        return "  ".join(f"{c['class'][:14]:<14} {c['probability']:>7.3f}" for c in row["top_k"])
    if "next" in row:  # a language model: the likeliest next tokens
        return "  ".join(f"{c.get('token', c['id'])!r:<8} {c['probability']:>6.3f}" for c in row["next"])
    answer = {key: value for key, value in row.items() if key not in ("image", "text")}
    return json.dumps(answer, separators=(", ", ": "))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with exit_codes():
        args = argv if argv is not None else sys.argv[1:]
        cfg = OmegaConf.merge(OmegaConf.structured(PredictConfig), OmegaConf.from_dotlist(args))
        if OmegaConf.is_missing(cfg, "run"):
            raise UserError(
                "run: missing; usage: python -m trainer.predict run=<run dir> inputs=[a.png,folder/]"
            )
        cfg = OmegaConf.to_object(cfg)
        results = predict(cfg)
        try:
            print(
                "\n".join(json.dumps(r) for r in results)
                if cfg.output == "jsonl"
                else show_table(results, cfg.topk)
            )
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            sys.stderr.close()
            raise SystemExit(0) from None
        if any("error" in r for r in results):
            print(
                f"error: inputs: {sum('error' in r for r in results)} of {len(results)} images could not be "
                "read "
                f"(see above)",
                file=sys.stderr,
            )
            raise SystemExit(2)


if __name__ == "__main__":
    main()
