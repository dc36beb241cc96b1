"""Memory of the steering backward pass with and without gradient checkpointing.

    python benchmarks/checkpoint_memory.py --model sd14 --size 256 --batch-size 2 --steps 2

Each configuration runs in a fresh process: build the architecture with random weights, then one
exact TraSCE call. The figure is the call's peak memory above what the process held before it: on
CUDA from the allocator's statistics, on CPU from the resident set size sampled every 2 ms. Prints
seconds and GiB per configuration and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(args: argparse.Namespace) -> dict:
    import torch

    from trasce.bench import synchronize
    from trasce.models import random as random_models
    from trasce.pipeline import DTYPES, TraSCEPipeline

    device = torch.device(args.device)
    pipe = random_models.build(args.model, dtype=DTYPES[args.dtype], device=device)
    pipe.set_progress_bar_config(disable=True)
    trasce = TraSCEPipeline.from_pipe(pipe, concept="naked, nude", loss_scale=1.0, step_size=1.0, sigma=1.0,
                                      lazy_tolerance=None)
    if args.checkpointing:
        trasce.enable_gradient_checkpointing()
    prompts = ["a photo of a mountain lake"] * args.batch_size
    peak = before = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, _rss_bytes())

    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    trasce(prompts, num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent")
    synchronize(device)
    seconds = time.perf_counter() - start
    done.set()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    return {"checkpointing": args.checkpointing, "seconds": seconds, "working_gib": (peak - before) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd14")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("checkpointing", "child", "out")},
               "rows": []}
    for checkpointing in (False, True):
        argv = [sys.executable, __file__, "--child", *[f"--{k.replace('_', '-')}={v}" for k, v in
                                                      results["config"].items()]]
        output = subprocess.run(argv + (["--checkpointing"] if checkpointing else []), check=True,
                                capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        results["rows"].append(row)
        print(f"gradient checkpointing {'on ' if checkpointing else 'off'}: {row['seconds']:.1f} s, "
              f"{row['working_gib']:.2f} GiB above the loaded model", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
