"""Predict and serve a finished run: the exports (ONNX too), `python -m trainer.predict`, and the HTTP
server in a subprocess on a free loopback port: predictions equal the eager model's, every malformed
request gets its status and the server keeps serving, 200 concurrent requests, a full queue, the
cache, and a graceful SIGTERM."""

import asyncio
import json
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, run_trainer, start_trainer, write_imagefolder

aiohttp = pytest.importorskip("aiohttp", reason="the serve extra is not installed")

FORMATS = ["torchscript", "torch_export", "onnx"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run on images of another size than the model's (40x30 -> resized and cropped to 32)."""
    root = tmp_path_factory.mktemp("serve")
    write_imagefolder(root / "images", per_class=12)
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    result = run_trainer(
        "dataset=imagefolder",
        f"dataset.root={root / 'images'}",
        "model=cnn",
        "model.width=8",
        *TINY_RUN,
        "loader.batch_size=8",
        f"export.formats=[{','.join(FORMATS)}]",
        f"hydra.run.dir={root / 'run'}",
    )
    assert result.returncode == 0, result.stderr
    return root / "run"


def images(run: Path) -> list[Path]:
    return sorted((run.parent / "images" / "val").rglob("*.*"))


def media_type(path: Path) -> str:
    return {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}[path.suffix]


def eager_probabilities(run: Path, files: list[Path]) -> torch.Tensor:
    """The run's best weights in a freshly built model, on images preprocessed here by hand."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from trainer import MODELS
    from trainer.core.checkpoint import load_checkpoint

    model = MODELS.build("cnn", num_classes=3, width=8).eval()
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "best.pt")["model"])
    batch = []
    for path in files:
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        image = F.center_crop(F.resize(image, 32, antialias=True), [32, 32])
        batch.append(F.normalize(F.to_dtype(image, torch.float32, scale=True), [0.5] * 3, [0.25] * 3))
    with torch.no_grad():
        return torch.softmax(model(torch.stack(batch)), 1)


def test_every_export_format_reloads_and_matches(run):
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert list(manifest["formats"]) == FORMATS
    assert all(r["parity"] and r["max_abs_diff"] < 1e-4 for r in manifest["formats"].values())
    assert (run / "export" / "model.onnx").is_file() and not (run / "export" / "model.onnx.data").exists()
    assert manifest["classes"] == ["cat", "dog", "frog"]
    assert manifest["preprocess"] == {
        "decode": "RGB",
        "resize_shorter_side": 32,
        "center_crop": [32, 32],
        "scale": 1 / 255,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "layout": "NCHW",
        "dtype": "float32",
    }


def test_predict_gives_the_eager_models_top_k(run):
    files, expected = images(run), eager_probabilities(run, images(run))
    result = run_trainer(
        f"run={run}",
        f"inputs=[{run.parent / 'images' / 'val'}]",
        "topk=2",
        "output=jsonl",
        module="trainer.predict",
    )  # the command, with the default format (torch_export)
    assert result.returncode == 0, result.stderr
    by_format = {"torch_export": [json.loads(line) for line in result.stdout.strip().splitlines()]}
    from trainer.predict import PredictConfig, predict

    for fmt in ("torchscript", "onnx"):  # the same code path in this process, for the other formats
        by_format[fmt] = predict(
            PredictConfig(run=str(run), inputs=[str(run.parent / "images" / "val")], format=fmt, topk=2)
        )
    for fmt, lines in by_format.items():
        assert [Path(line["image"]) for line in lines] == files, fmt
        for line, probabilities in zip(lines, expected):
            top = line["top_k"]
            assert len(top) == 2 and top[0]["index"] == int(probabilities.argmax()), fmt
            assert top[0]["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5), fmt
            assert top[0]["class"] == ["cat", "dog", "frog"][top[0]["index"]]


def predict_in_process(capsys, *args: str) -> tuple[int, str, str]:
    from trainer.predict import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_predict_shows_a_table_and_refuses_bad_inputs(run, tmp_path, capsys):
    code, out, _ = predict_in_process(capsys, f"run={run}", f"inputs=[{images(run)[0]}]")
    header, row = out.splitlines()
    assert (
        code == 0
        and header.split()[:3] == ["image", "top-1", "top-2"]
        and row.startswith(str(images(run)[0]))
    )
    code, _, err = predict_in_process(capsys, f"run={run}", "inputs=[nowhere.png]")
    assert (
        code == 2 and err.strip() == "error: inputs: nowhere.png does not exist; give image files or folders"
    )
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, out, err = predict_in_process(
        capsys, f"run={run}", f"inputs=[{tmp_path / 'broken.png'},{images(run)[0]}]"
    )
    assert code == 2 and "1 of 2 images could not be read" in err
    rows = out.splitlines()[1:]
    assert (
        "error: not a PNG, JPEG, WebP or GIF image" in rows[0] and "error" not in rows[1]
    )  # the good one answered
    code, _, err = predict_in_process(capsys, f"run={run}", "inputs=[x.png]", "format=tensorrt")
    assert code == 2 and "format: 'tensorrt' is not among this run's exports" in err
    code, _, err = predict_in_process(capsys, f"run={run}", "inputs=[x.png]", "topk=0")
    assert code == 2 and "topk: must be 1 or more" in err
    code, _, err = predict_in_process(capsys, "inputs=[x.png]")
    assert code == 2 and "run: missing" in err


@contextmanager
def server(run: Path, *settings: str):
    process = start_trainer(
        f"run={run}", "serve.port=0", *settings, module="trainer.serve", stdout=subprocess.PIPE
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving"), line + process.stderr.read()
        yield process, line.strip().rsplit(" ", 1)[-1]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


SHARED = ("serve.max_wait_ms=10", "serve.max_batch_size=16", "serve.max_body_bytes=2000000")


@pytest.fixture(scope="module")
def shared(run):
    """One server for the tests that need no settings of their own."""
    with server(run, *SHARED) as (_, url):
        yield url


async def post(session, url: str, data, content_type: str | None = None, **params):
    headers = {"Content-Type": content_type} if content_type else {}
    async with session.post(f"{url}/v1/predict", data=data, headers=headers, params=params) as response:
        return response.status, await response.json(content_type=None)


def test_the_server_answers_as_the_eager_model_does(run, shared):
    files, url = images(run), shared
    expected = eager_probabilities(run, files)

    async def check():
        async with aiohttp.ClientSession() as session:
            for path, probabilities in zip(files, expected):  # raw bytes
                status, body = await post(session, url, path.read_bytes(), media_type(path), topk=3)
                assert status == 200, body
                got = {c["index"]: c["probability"] for c in body["predictions"][0]["top_k"]}
                assert got == pytest.approx({i: float(p) for i, p in enumerate(probabilities)}, abs=1e-5)
            form = aiohttp.FormData()  # multipart, two files in one request
            for path in files[:2]:
                form.add_field("image", path.read_bytes(), filename=path.name)
            status, body = await post(session, url, form)
            assert status == 200 and len(body["predictions"]) == 2
            from trainer.serving.predictor import Predictor

            tensors = torch.stack([Predictor(run).decode(p.read_bytes()) for p in files[:3]])
            status, body = await post(
                session, url, json.dumps({"inputs": tensors.tolist()}), "application/json"
            )
            assert (
                status == 200
                and [p["top_k"][0]["index"] for p in body["predictions"]] == expected[:3].argmax(1).tolist()
            )
            async with session.get(f"{url}/v1/metadata") as response:
                meta = await response.json()
            assert meta["classes"] == ["cat", "dog", "frog"] and meta["input"]["shape"] == [-1, 3, 32, 32]
            assert meta["format"] == "torch_export" and set(meta["formats"]) == set(FORMATS)

    asyncio.run(check())


BAD_REQUESTS = [
    (b"not an image", "image/png", 400, "not a PNG, JPEG, WebP or GIF image"),
    (b'{"inputs": [1, 2', "application/json", 400, "malformed JSON"),
    (b"plain words", "text/plain", 415, "content type"),
    (b'{"inputs": [[1.0, 2.0], [3.0, 4.0]]}', "application/json", 422, "shape"),
    (b'{"inputs": [1, 2], "dtype": "int8"}', "application/json", 422, "dtype must be float32"),
    (b'{"inputs": [["a"]]}', "application/json", 422, "numbers"),
    (b'{"pixels": []}', "application/json", 422, '"inputs"'),
    (
        json.dumps({"inputs": torch.zeros(17, 3, 32, 32).tolist()}).encode(),
        "application/json",
        422,
        "at most",
    ),
    (b"\x00" * 3_000_000, "image/png", 413, "serve.max_body_bytes"),  # over the shared server's 2,000,000
]


def test_each_bad_request_gets_its_status_and_the_server_keeps_serving(run, shared):
    good, url = images(run)[0].read_bytes(), shared

    async def check():
        async with aiohttp.ClientSession() as session:
            for body, content_type, status, needle in BAD_REQUESTS:
                got, answer = await post(session, url, body, content_type)
                assert got == status, (content_type, body[:40], answer)
                if needle:
                    assert needle in answer["error"], answer
                ok, _ = await post(session, url, good, "image/png")  # the next one is fine
                assert ok == 200
            assert (await post(session, url, good, "image/png", topk="many"))[0] == 400

    asyncio.run(check())


def test_two_hundred_concurrent_requests_are_batched_and_all_answered(run, shared):
    files, url = [p.read_bytes() for p in images(run)], shared

    async def check():
        async with aiohttp.ClientSession() as session:
            before = await batches(session, url)
            answers = await asyncio.gather(
                *(post(session, url, files[i % len(files)], "application/octet-stream") for i in range(200))
            )
            assert [status for status, _ in answers] == [200] * 200
            first = {i: answers[i][1]["predictions"][0]["top_k"][0]["index"] for i in range(len(files))}
            assert all(
                a[1]["predictions"][0]["top_k"][0]["index"] == first[i % len(files)]
                for i, a in enumerate(answers)
            )  # batched with others, the same answer
            async with session.get(f"{url}/healthz") as response:
                health = await response.json()
            assert (
                health["status"] == "ok" and health["batches"] - before < 200
            )  # requests shared forward passes

    asyncio.run(check())


@pytest.fixture(scope="module")
def small_queue(run):
    """A server with a queue of 4, a long wait for a batch to fill, and a cache of 4 predictions."""
    with server(
        run, "serve.max_queue=4", "serve.max_wait_ms=300", "serve.max_batch_size=64", "serve.cache_size=4"
    ) as (_, url):
        yield url


async def batches(session, url: str) -> int:
    async with session.get(f"{url}/healthz") as response:
        return (await response.json())["batches"]


def test_a_full_queue_answers_503_and_then_recovers(run, small_queue):
    (first, _), (second, kind) = ((path.read_bytes(), media_type(path)) for path in images(run)[:2])

    async def check():
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(
                *(post(session, small_queue, first, "image/png") for _ in range(12))
            )
            statuses = sorted(status for status, _ in answers)
            assert statuses == [200] * 4 + [503] * 8, statuses
            assert "busy" in next(a for s, a in answers if s == 503)["error"]
            before = await batches(session, small_queue)
            assert (await post(session, small_queue, second, kind))[0] == 200  # not cached: the model ran
            assert await batches(session, small_queue) == before + 1

    asyncio.run(check())


def test_the_cache_answers_a_repeated_request_without_the_model(run, small_queue):
    path = images(run)[2]
    image, kind = path.read_bytes(), media_type(path)

    async def check():
        async with aiohttp.ClientSession() as session:
            before = await batches(session, small_queue)
            first = await post(session, small_queue, image, kind)
            second = await post(session, small_queue, image, kind)
            assert first == second and first[0] == 200
            assert await batches(session, small_queue) == before + 1

    asyncio.run(check())


def test_sigterm_answers_the_requests_in_flight_then_exits(run):
    good = images(run)[0].read_bytes()
    with server(run, "serve.max_wait_ms=1500", "serve.max_batch_size=64") as (process, url):

        async def check():
            async with aiohttp.ClientSession() as session:
                requests = [asyncio.create_task(post(session, url, good, "image/png")) for _ in range(5)]
                await asyncio.sleep(0.5)  # received, waiting for their batch
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*requests)

        answers = asyncio.run(check())
        assert [status for status, _ in answers] == [200] * 5
        assert process.wait(timeout=30) == 0


def test_bad_server_settings_are_one_line_exit_2(run, capsys):
    from trainer.serve import main

    for args, needle in [
        ((f"run={run}", "serve.max_batch_size=0"), "serve.max_batch_size: must be 1 or more, got 0"),
        ((f"run={run.parent}",), "has no export/manifest.json"),
        ((f"run={run}", "serve.prot=80"), "serve.prot"),
        (("serve.port=80",), "run: missing"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_a_tensor_request_is_checked_before_it_joins_a_batch(run):
    from trainer.serving.predictor import InputError, Predictor

    predictor = Predictor(run)
    with pytest.raises(InputError, match="shape"):
        predictor.check(torch.zeros(3, 16, 16))
    with pytest.raises(InputError, match="finite"):
        predictor.check(torch.full((3, 32, 32), float("nan")))
    assert predictor.check(torch.zeros(3, 32, 32)).shape == (1, 3, 32, 32)
