"""Per-process memory of the GPT's training state under DDP and under FSDP (trainer.strategy=fsdp), with
2 processes on this machine's CPU (gloo), side by side in one run.

    python benchmarks/sharding.py                 # experiment=shakespeare_char's GPT: 6 x 384, block 256
    python benchmarks/sharding.py --tiny          # 2 x 32, block 32: for the test suite

Each strategy runs in processes of its own (torch.multiprocessing), wraps the model as the trainer does
(DDP, or trainer.run.sharding.shard: each block and the root fully_shard-ed), and trains a few steps of
AdamW on the same random tokens. Measured after a step, per process: the bytes of the parameters,
gradients and optimizer state this process holds (a DTensor's local shard, the whole tensor otherwise),
the step time (median), and the process's peak RSS. DDP's gradient buckets are not counted: the
comparison is of what each strategy must hold, not of DDP's extra copy.
"""

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # a DTensor: this process's shard
        total += t.numel() * t.element_size()
    return total


def worker(rank: int, world: int, port: int, strategy: str, args: argparse.Namespace, out: str) -> None:
    from trainer.models import MODELS
    from trainer.optim import OPTIMIZERS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = MODELS.build(
        "gpt", vocab_size=256, block_size=args.block, n_layer=args.layers, n_head=args.heads,
        n_embd=args.width, dropout=0.0,
    )  # fmt: skip
    if strategy == "fsdp":
        from trainer.run.sharding import shard

        stepped = shard(model, torch.device("cpu"), "32", False, "gpt")
    else:
        stepped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = OPTIMIZERS.build("adamw", model=model, lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(rank)
    times, figures = [], {}
    for step in range(args.steps + 1):
        ids = torch.randint(256, (args.batch, args.block + 1), generator=generator)
        started = time.perf_counter()
        logits = stepped(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        if step == args.steps:  # after a step: gradients and optimizer state exist
            params = list(model.parameters())
            figures = {
                "parameters_mb": local_bytes(params) / 2**20,
                "gradients_mb": local_bytes(p.grad for p in params if p.grad is not None) / 2**20,
                "optimizer_mb": local_bytes(
                    v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
                )
                / 2**20,
            }
        optimizer.zero_grad(set_to_none=False)
        if step:  # the first step builds what the rest reuse
            times.append(time.perf_counter() - started)
    figures["state_mb"] = figures["parameters_mb"] + figures["gradients_mb"] + figures["optimizer_mb"]
    figures["step_ms"] = statistics.median(times) * 1000
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{strategy}-{rank}.json").write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(strategy: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(args.processes, free_port(), strategy, args, out), nprocs=args.processes)
        ranks = [json.loads(Path(out, f"{strategy}-{r}.json").read_text()) for r in range(args.processes)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}  # the largest process's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per process and step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="2 x 32, block 32, 2 steps: the test suite's")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.heads, args.width, args.block, args.batch, args.steps = 2, 2, 32, 32, 2, 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    found = {strategy: measure(strategy, args) for strategy in ("ddp", "fsdp")}
    ddp, fsdp = found["ddp"], found["fsdp"]
    print(
        f"GPT {args.layers} x {args.width}, block {args.block}, batch {args.batch} x {args.processes} "
        "processes (gloo, CPU)"
    )
    print(f"{'per process':<28}{'DDP':>10}{'FSDP':>10}{'FSDP/DDP':>10}")
    for key, label in (
        ("parameters_mb", "parameters MB"),
        ("gradients_mb", "gradients MB"),
        ("optimizer_mb", "optimizer state MB"),
        ("state_mb", "all three MB"),
        ("step_ms", "step ms (median)"),
        ("peak_rss_mb", "peak RSS MB"),
    ):
        print(f"{label:<28}{ddp[key]:>10.1f}{fsdp[key]:>10.1f}{fsdp[key] / ddp[key]:>10.2f}")
    result = {
        "benchmark": "sharding",
        "processes": args.processes,
        "ddp": ddp,
        "fsdp": fsdp,
        "state_ratio": fsdp["state_mb"] / ddp["state_mb"],
        "step_time_ratio": fsdp["step_ms"] / ddp["step_ms"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
