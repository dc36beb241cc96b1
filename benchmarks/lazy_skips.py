"""How large the steering updates that lazy steering skips are, for several growth factors of its estimate.

    python benchmarks/lazy_skips.py --growth 1.0 1.25 1.5 --out lazy-skips.json
    python benchmarks/lazy_skips.py --steps 10 --growth 1.5 2 3 --out lazy-skips-10-steps.json

Lazy steering skips an image's backward pass when its update, estimated from the kernel's slope
and an estimate of ``||dd/dx||`` (the largest measured so far, times 2, times ``growth`` for every
step since the image was last measured), is below the tolerance. Here every step of the lazy path
is also replayed on the exact path from the same latent, and each skipped image's true update is
divided by the tolerance: above 1, the estimate let through an update it should have made.
Embedded model, concept-near *test* captions of several seeds, default tolerance. For each growth
factor it also counts the backward passes per image on 16 concept-near and 16 benign captions (the
batches ``real_prompt_cost.py`` times).
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

import trasce.sampler as sampler
from trasce import TraSCEPipeline
from trasce.pipeline import model_call_defaults
from trasce.runs import source_commit
from trasce.toy.prompts import speed_prompt_sets

#: (seed, captions) of the concept-near sets whose skipped updates are replayed
PROBE_SETS = ((200, 6), (300, 4), (100, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--preset", default="toy-shape")
    parser.add_argument("--growth", type=float, nargs="+", default=[1.0, 1.25, 1.5])
    parser.add_argument("--steps", type=int, help="denoising steps [default: the embedded model's]")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    commit = source_commit()  # of the code imported now, whatever the checkout holds when the run ends

    defaults = model_call_defaults("toy")
    steps, scale = args.steps or defaults["steps"], defaults["guidance_scale"]
    pipe = TraSCEPipeline.from_pretrained("toy", concept=args.concept, preset=args.preset)
    lazy_step = sampler._steering_step
    skipped: list[float] = []  # true update / tolerance of every skipped (image, step)

    def replaying_step(denoise, scheduler, latents, t, *rest):
        settings, estimate, step = rest[3], rest[6], rest[8]
        exact_rest = (*rest[:3], replace(settings, lazy_tolerance=None), *rest[4:6], copy.deepcopy(estimate),
                      rest[7], sampler.Step(index=step.index, timestep=t, latents=latents), None)
        _, steered, _ = lazy_step(denoise, scheduler, latents, t, *exact_rest)
        result = lazy_step(denoise, scheduler, latents, t, *rest)
        # Sizes on the denoiser's input, as the tolerance is measured (DDIM's input scale is 1).
        sizes = (steered - latents).flatten(1).pow(2).mean(1).sqrt() / settings.lazy_tolerance
        skipped.extend(sizes[~result[2].steered].tolist())
        return result

    def run(prompts: list[str], seed: int):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=steps, guidance_scale=scale, generator=generators,
                    output_type="latent")

    rows = []
    for growth in args.growth:
        sampler._GradientNormEstimate.growth = growth
        sampler._steering_step = lazy_step
        sets = speed_prompt_sets(args.concept, 16, 200)
        passes = {kind: run(prompts, 200).steered_steps.float().mean().item() for kind, prompts in sets.items()}
        sampler._steering_step = replaying_step
        skipped.clear()
        for seed, n in PROBE_SETS:
            run(speed_prompt_sets(args.concept, n, seed)["concept-near"], seed)
        sampler._steering_step = lazy_step
        row = {"growth": growth, "skipped": len(skipped), "largest_skipped_over_tolerance": max(skipped, default=0.0),
               "skipped_over_tolerance_above_1": sum(size > 1 for size in skipped),
               "backward_passes_per_image": passes}
        rows.append(row)
        print(f"growth {growth:g}: largest skipped update {row['largest_skipped_over_tolerance']:.2f} x the tolerance "
              f"({row['skipped_over_tolerance_above_1']} of {len(skipped)} skipped above it); backward passes per "
              f"image {passes['concept-near']:.1f} concept-near, {passes['benign']:.1f} benign (of {steps})",
              flush=True)
    result = {"concept": args.concept, "preset": args.preset, "steps": steps, "guidance_scale": scale,
              "tolerance": pipe.settings.lazy_tolerance, "probe_sets": PROBE_SETS, "trasce_commit": commit,
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
