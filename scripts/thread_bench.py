"""How many torch threads should `hf-posenc compare` use? Time training steps of the default comparison's model at each
thread count, on an idle machine and with other processes holding cores, and print the ratios.

    python scripts/thread_bench.py                 # 1 and all cores, with 0 and 1 busy processes
    python scripts/thread_bench.py --busy 0,1,2 --steps 30

A busy process is a Python loop that never sleeps, standing in for another job on a shared machine. Each setting runs
in a fresh process (torch's thread pool is sized once per process), so settings do not disturb each other; the ratio
is the median step time against one thread in the same load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time, torch
import hf_posenc
from transformers import AutoModelForCausalLM
from hf_posenc.workflow.compare import tiny_config
threads, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_config("gpt2", 4, 128, 4, 64), posenc="alibi")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = torch.randint(0, 256, (16, 64))
times = []
for step in range(steps + 3):
    began = time.perf_counter()
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step >= 3:
        times.append(time.perf_counter() - began)
print(json.dumps({"threads": threads, "median_s": statistics.median(times)}))
"""


def spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--threads", default=f"1,{cores}", help="comma-separated torch thread counts")
    parser.add_argument("--busy", default="0,1", help="comma-separated numbers of busy processes")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per setting")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    for busy in [int(n) for n in args.busy.split(",")]:
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for process in spinners:
            process.start()
        time.sleep(1.0 if busy else 0.0)
        try:
            results = {}
            for threads in [int(n) for n in args.threads.split(",")]:
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(threads), str(args.steps)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[threads] = json.loads(done.stdout.strip().splitlines()[-1])["median_s"]
        finally:
            for process in spinners:
                process.terminate()
        one = results.get(1, statistics.median(results.values()))
        for threads, seconds in results.items():
            rows.append({"busy": busy, "threads": threads, "step_s": seconds, "x_one_thread": seconds / one})
    print(f"{cores} cores; 1-minute load average before: {load_before:.2f}")
    print("| busy processes | torch threads | median step (s) | time x 1 thread |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['busy']} | {row['threads']} | {row['step_s']:.3f} | {row['x_one_thread']:.2f} |")


if __name__ == "__main__":
    main()
