"""Is a GPU run bound by the GPU or by the CPU launching its kernels? Rows called in turn, then profiled.

    python benchmarks/launch_profile.py --model sd14 --dtype fp16 --device cuda --steps 20 --batch-size 4

Times plain CFG (diffusers), part 1 alone, the exact path (two denoiser calls per step, and one
with ``one_call``) and the lazy path forced on and off, calling the rows in turn for two rounds
(so that drift touches them alike), and prints whether each row ran NaN-free and how many backward
passes it ran. On CUDA it then profiles one call of each row and prints the profiler's table: when
the CPU time of a call exceeds its CUDA time, the GPU waits for kernel launches, and costs follow
the number of launches rather than the FLOPs. Results of the run on an H100 (made before the
``one_call`` row existed): ``benchmarks/results/h100-launch-profile.md``.
"""

from __future__ import annotations

import argparse
import time

import torch

from trasce.bench import synchronize
from trasce.models import random as random_models
from trasce.pipeline import DTYPES, TraSCEPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd14", choices=sorted(random_models.BUILDERS))
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    pipe = random_models.build(args.model, dtype=DTYPES[args.dtype], device=device)
    pipe.set_progress_bar_config(disable=True)
    trasce = TraSCEPipeline.from_pipe(pipe, concept="naked, nude", loss_scale=1.0, step_size=1.0, sigma=1.0)
    rows = {"plain CFG": None, "negation": trasce.with_settings(mode="negation"),
            "exact": trasce.with_settings(lazy_tolerance=None, one_call=False),
            "exact, one call": trasce.with_settings(lazy_tolerance=None, one_call=True),
            "lazy on": trasce.with_settings(lazy_tolerance=0.0, one_call=False),
            "lazy off": trasce.with_settings(lazy_tolerance=float("inf"), one_call=False)}
    prompts = ["a photo of a mountain lake"] * args.batch_size

    def call(variant):
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch_size)]
        runner = pipe if variant is None else variant
        out = runner(prompts, num_inference_steps=args.steps, generator=gens, output_type="latent")
        synchronize(device)
        return out

    for name, variant in rows.items():
        out = call(variant)
        steered = getattr(out, "steered_steps", None)
        print(f"{name}: NaN in latents {torch.isnan(out.images.float()).any().item()}, backward passes per image "
              f"{None if steered is None else steered.tolist()}", flush=True)
    for round_ in range(args.rounds):
        for name, variant in rows.items():
            start = time.perf_counter()
            call(variant)
            print(f"round {round_} {name}: {(time.perf_counter() - start) / args.batch_size:.3f} s/image", flush=True)
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    for name, variant in rows.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call(variant)
        print(f"== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8,
                                                          max_name_column_width=40), flush=True)


if __name__ == "__main__":
    main()
