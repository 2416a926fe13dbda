"""Where `experiment=cifar10_fast`'s step time goes on this machine: one training step (forward, backward,
optimizer) of the experiment's fastnet at its batch size, under each execution setting the recipe could
pick (eager or torch.compile, float32 or bf16 autocast, channels_last or not), timed alternately, with
the most expensive operators of the eager bf16 step from torch.profiler.

    python benchmarks/fast_step.py                        # the recipe's widths and batch (1,024)
    python benchmarks/fast_step.py --batch-size 256 --widths 32 64 64 --steps 5

Random inputs and labels: the time of a step does not depend on the pixels. Compile warm-up is outside
the timing (reported apart), as in the trainer.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from trainer.models.fastnet import fastnet


def make_step(compiled: bool, bf16: bool, channels_last: bool, widths: list[int]):
    torch.manual_seed(0)
    model = fastnet(10, widths=tuple(widths))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.85, nesterov=True
    )
    run = torch.compile(model) if compiled else model

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(run(images), labels, label_smoothing=0.2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 256])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled settings")
    args = parser.parse_args(argv)
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    settings = [
        (compiled, bf16, True)
        for compiled in ((False,) if args.no_compile else (False, True))
        for bf16 in (False, True)
    ] + [(False, True, False)]
    steps, warm_up = {}, {}
    for setting in settings:
        step = make_step(*setting, args.widths)
        started = time.perf_counter()
        x = images.contiguous(memory_format=torch.channels_last) if setting[2] else images
        step(x, labels)  # compiles a compiled setting
        warm_up[setting] = time.perf_counter() - started
        steps[setting] = (step, x)
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):  # alternately: the machine's speed drifts
        for setting in settings:
            step, x = steps[setting]
            started = time.perf_counter()
            for _ in range(args.steps):
                step(x, labels)
            times[setting].append((time.perf_counter() - started) / args.steps)
    name = {
        s: f"{'compiled' if s[0] else 'eager'} {'bf16' if s[1] else 'fp32'}{' channels_last' if s[2] else ''}"
        for s in settings
    }
    median = {s: statistics.median(t) * 1000 for s, t in times.items()}
    fastest = min(median, key=median.get)
    for s in settings:
        print(
            f"{name[s]:<32} {median[s]:8.1f} ms/step  {median[s] / median[fastest]:5.2f}x the fastest"
            f"{f'  (compile warm-up {warm_up[s]:.0f} s)' if s[0] else ''}"
        )
    step, x = steps[(False, True, True)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(x, labels)
    table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    print("eager bf16 channels_last, the most expensive operators of one step:\n" + table)
    summary = {
        "benchmark": "fast_step",
        "batch_size": args.batch_size,
        "widths": args.widths,
        "ms_per_step": {name[s]: median[s] for s in settings},
        "fastest": name[fastest],
        "compile_warm_up_s": {name[s]: warm_up[s] for s in settings if s[0]},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
