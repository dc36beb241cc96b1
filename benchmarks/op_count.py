"""How many operator calls each `trasce bench` row makes per denoising step: its cost on a launch-bound GPU.

    python benchmarks/op_count.py --model sd14-narrow --batch-size 4 --out op-count.json

On the H100 that timed `trasce bench` (docs/speed.md), every row spent more CPU time launching
kernels than the GPU spent running them, so a row cost about what its number of launches cost.
This counts, on the CPU, the ATen operator calls that reach the dispatcher, forward and backward
passes alike. On a GPU each is one or more kernel launches, except those that only make a view of
a tensor (``is_view``, and ``_unsafe_view``), which are counted apart. The count does not depend
on the weights, and only by a few calls on the image size and dtype: it follows the architecture's
topology and the batch's branches. ``sd14-narrow`` has SD v1.4's blocks, layers and heads with
narrow layers, so it counts what SD v1.4 launches in seconds on a CPU.

Each row is called at ``--steps`` and twice as many steps, with ``output_type="latent"`` (no VAE
decoding); the difference gives the calls per step, the rest is what a call does once (text
encoding). The ratio to plain CFG is given per step and for a whole call of ``--at`` steps.
Syncs (the lazy path waits for the GPU to choose the images that take a backward pass) are not seen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import diffusers
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trasce import TraSCEPipeline
from trasce.bench import CONCEPT, PROMPT, trasce_variants
from trasce.models import random as random_models
from trasce.runs import source_commit

VIEWS_THAT_ARE_NOT_VIEWS = {torch.ops.aten._unsafe_view.default}  # a reshape's result: no copy, no launch


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operator calls made while it is active; ``views`` counts those that only alias."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.views += bool(func.is_view or func in VIEWS_THAT_ARE_NOT_VIEWS)
        return func(*args, **(kwargs or {}))


def count(call, steps: int) -> tuple[int, int]:
    """``(calls, views)`` of one ``call(steps)``."""
    with OperatorCount() as counter:
        call(steps)
    return counter.calls, counter.views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd14-narrow", choices=sorted(random_models.BUILDERS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels (changes the count "
                        "by a few calls per step; 512 px takes far longer on a CPU)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--at", type=int, default=50, help="steps of the whole call whose ratio is reported")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    started, commit = time.perf_counter(), source_commit()
    pipe = random_models.build(args.model)
    pipe.set_progress_bar_config(disable=True)
    trasce = TraSCEPipeline.from_pipe(pipe, concept=CONCEPT, loss_scale=1.0, step_size=1.0, sigma=1.0)
    prompts = [PROMPT] * args.batch_size
    common = dict(height=args.size, width=args.size, output_type="latent")

    def row(pipeline, **kwargs):
        return lambda steps: pipeline(prompts, num_inference_steps=steps, **common, **kwargs)

    rows = {
        "plain CFG (diffusers)": row(pipe),
        "negative prompt (diffusers)": row(pipe, negative_prompt=[CONCEPT] * args.batch_size),
        **{method + ("" if kind == "any" else f", {kind} (forced)"): row(variant)
           for (method, kind), variant in trasce_variants(trasce).items()},
    }
    results = []
    for name, call in rows.items():
        call(1)  # first calls build caches (tokenizer, scheduler tables) that later calls do not rebuild
        (short, short_views), (long, long_views) = count(call, args.steps), count(call, 2 * args.steps)
        per_step = (long - short) / args.steps
        results.append({"method": name, "calls_per_step": per_step, "views_per_step": (long_views - short_views)
                        / args.steps, "calls_once": short - args.steps * per_step})
    plain = results[0]
    for r in results:
        r["ratio_per_step"] = r["calls_per_step"] / plain["calls_per_step"]
        r["ratio_per_step_without_views"] = ((r["calls_per_step"] - r["views_per_step"])
                                             / (plain["calls_per_step"] - plain["views_per_step"]))
        whole = r["calls_once"] + args.at * r["calls_per_step"]
        r[f"ratio_at_{args.at}_steps"] = whole / (plain["calls_once"] + args.at * plain["calls_per_step"])
        print(f"{r['method']:<38} {r['calls_per_step']:7.0f} calls/step ({r['views_per_step']:5.0f} views), "
              f"{r['ratio_per_step']:.2f}x plain per step ({r['ratio_per_step_without_views']:.2f}x without views), "
              f"{r[f'ratio_at_{args.at}_steps']:.2f}x at {args.at} steps",
              flush=True)
    if args.out:
        result = {"model": args.model, "batch_size": args.batch_size, "size": args.size, "dtype": "fp32",
                  "steps": [args.steps, 2 * args.steps], "torch": torch.__version__,
                  "diffusers": diffusers.__version__, "counted": "ATen operator calls through the dispatcher "
                  "(TorchDispatchMode), forward and backward", "trasce_commit": commit,
                  "seconds": round(time.perf_counter() - started, 1), "rows": results}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
