"""How many operator calls each `trasce bench` row makes per denoising step: its cost on a launch-bound GPU.

    python benchmarks/op_count.py --model sd14-narrow --batch-size 4 --out op-count.json

On the H100 that timed `trasce bench` (README "Speed"), every row spent more CPU time launching
kernels than the GPU spent running them, so a row cost about what its number of launches cost.
This counts, on the CPU, the ATen operator calls that reach the dispatcher (forward and backward
passes alike; each is one or more kernel launches on a GPU, except the views, counted apart). The
count does not depend on the weights, the device or the image size, only on the architecture's
topology and the batch's branches: ``sd14-narrow`` has SD v1.4's blocks, layers and heads at a
tenth of its widths, so it counts what SD v1.4 launches, in seconds.

Each row is called at ``--steps`` and twice as many steps; the difference gives the calls per
step, the rest is what a call does once (text encoding, decoding). The ratio to plain CFG is given
per step and for a whole call of ``--at`` steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trasce import TraSCEPipeline
from trasce.models import random as random_models


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operator calls made while it is active; ``views`` counts those that only alias."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.views += bool(func.is_view)
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
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels (does not change "
                        "the count)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--at", type=int, default=50, help="steps of the whole call whose ratio is reported")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    pipe = random_models.build(args.model)
    pipe.set_progress_bar_config(disable=True)
    concept = "naked, nude, bare, exposed"
    trasce = TraSCEPipeline.from_pipe(pipe, concept=concept, loss_scale=1.0, step_size=1.0, sigma=1.0)
    prompts = ["a photo of a mountain lake at dawn"] * args.batch_size
    common = dict(height=args.size, width=args.size, output_type="latent")

    def row(pipeline, **kwargs):
        return lambda steps: pipeline(prompts, num_inference_steps=steps, **common, **kwargs)

    rows = {
        "plain CFG (diffusers)": row(pipe),
        "negative prompt (diffusers)": row(pipe, negative_prompt=[concept] * args.batch_size),
        "trasce negation": row(trasce.with_settings(mode="negation")),
        "trasce lazy, benign (forced off)": row(trasce.with_settings(lazy_tolerance=float("inf"))),
        "trasce lazy, concept-near (forced on)": row(trasce.with_settings(lazy_tolerance=0.0)),
        "trasce exact": row(trasce.with_settings(lazy_tolerance=None)),
        "trasce exact, one call": row(trasce.with_settings(lazy_tolerance=None, one_call=True)),
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
        result = {"model": args.model, "batch_size": args.batch_size, "steps": [args.steps, 2 * args.steps],
                  "torch": torch.__version__, "counted": "ATen operator calls through the dispatcher "
                  "(TorchDispatchMode), forward and backward", "rows": results}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
