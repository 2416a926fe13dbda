"""How long a command takes to answer, against a bare `python -c "import torch"` measured alternately in
the same run (medians of several rounds): what a user pays before the first line of output.

    python benchmarks/startup.py              # 7 rounds
    python benchmarks/startup.py --rounds 3

Commands: `python -m trainer --help`, `python -m trainer --cfg job model=cnn`, an exit-2 config error
(`trainer.max_epochs=0`, found by our validation after composition), and `python -m trainer.predict`
with no arguments (its one-line usage error). Prints a table and a JSON line with medians and ratios.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import torch (baseline)": ["-c", "import torch"],
    "trainer --help": ["-m", "trainer", "--help"],
    "trainer --cfg job": ["-m", "trainer", "--cfg", "job", "model=cnn"],
    "trainer config error (exit 2)": ["-m", "trainer", "trainer.max_epochs=0"],
    "trainer.predict usage error (exit 2)": ["-m", "trainer.predict"],
}


def seconds(args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    codes: dict[str, int] = {}
    for _ in range(args.rounds):  # alternating, so a slower moment of the machine hits every command
        for name, command in COMMANDS.items():
            elapsed, codes[name] = seconds(command)
            times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["import torch (baseline)"]
    summary = {"rounds": args.rounds, "median_s": {}, "ratio_to_import_torch": {}, "exit_codes": codes}
    print(f"{'command':<40}{'median s':>10}{'x torch':>10}{'exit':>6}")
    for name, median in medians.items():
        print(f"{name:<40}{median:>10.2f}{median / base:>10.2f}{codes[name]:>6}")
        summary["median_s"][name] = round(median, 3)
        summary["ratio_to_import_torch"][name] = round(median / base, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
