"""What trasce's default lazy path costs on real prompts, not on the forced rows of ``trasce bench``.

    python benchmarks/real_prompt_cost.py --concept circle --n 16 --repeats 3 --out cost.json

``trasce bench`` emulates concept-near prompts by forcing a backward pass at every step: the worst
case. Real prompts that ask for the concept come near it for some steps only, and the lazy path
skips the rest. On the embedded model and *test* captions (concept-near: the concept by name or
alias; benign: another value of its attribute), one batch per prompt set, this times plain CFG
(diffusers' pipeline), part 1 alone, the exact path and the default lazy path on the same prompts
and seeds, rows in turn (``trasce.bench.time_round_robin``), and reports seconds per image, the
ratio to plain CFG and backward passes per image.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from trasce import TraSCEPipeline
from trasce.bench import time_round_robin
from trasce.pipeline import model_call_defaults
from trasce.runs import source_commit
from trasce.toy.prompts import add_speed_arguments, speed_prompt_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_speed_arguments(parser, n=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    commit = source_commit()  # of the code imported now, whatever the checkout holds when the run ends

    defaults = model_call_defaults("toy")
    steps, scale = defaults["steps"], defaults["guidance_scale"]
    sets = speed_prompt_sets(args.concept, args.n, args.seed)
    trasce = TraSCEPipeline.from_pretrained("toy", concept=args.concept, preset=args.preset)
    trasce.pipe.set_progress_bar_config(disable=True)
    device = torch.device("cpu")
    common = dict(num_inference_steps=steps, guidance_scale=scale, output_type="latent")
    variants = {"plain CFG (diffusers)": trasce.pipe, "trasce negation": trasce.with_settings(mode="negation"),
                "trasce exact": trasce.with_settings(lazy_tolerance=None), "trasce lazy (default)": trasce}
    rows = []
    for kind, prompts in sets.items():
        def call(pipe, prompts=prompts):
            def run():  # the same seeds at every call
                generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
                return pipe(prompts, generator=generators, **common)
            return run

        methods = {name: call(pipe) for name, pipe in variants.items()}
        measured = time_round_robin(list(methods.values()), device, args.repeats)
        plain = measured[0][0]
        for name, (seconds, _, output) in zip(methods, measured, strict=True):
            steered = getattr(output, "steered_steps", None)
            row = {"prompts": kind, "method": name, "images": len(prompts),
                   "seconds_per_image": seconds / len(prompts), "ratio_to_plain": seconds / plain,
                   "backward_passes": None if steered is None else steered.float().mean().item()}
            rows.append(row)
            passes = "" if row["backward_passes"] is None else f", {row['backward_passes']:.1f} backward passes"
            print(f"{kind:>12} {name:<22} {row['seconds_per_image']:.3f} s/image, {row['ratio_to_plain']:.2f}x "
                  f"plain{passes}", flush=True)
    result = {"concept": args.concept, "preset": args.preset, "steps": steps, "guidance_scale": scale,
              "repeats": args.repeats, "settings": vars(trasce.settings),
              "machine": {"device": platform.processor() or "cpu", "torch": torch.__version__,
                          "threads": torch.get_num_threads()}, "trasce_commit": commit, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
