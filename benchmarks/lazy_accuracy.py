"""How far lazy steering moves the final images from the exact path, and how much it skips.

    python benchmarks/lazy_accuracy.py --concept circle --out lazy.json

On the embedded model and *test* captions: benign prompts (other shapes) and concept-near prompts
(the concept by name or alias). For each tolerance, the final images of the lazy path against the
exact path (same seeds): the largest pixel difference in 8-bit levels, the RMS difference, the
share of (image, step) backward passes skipped, and the share of images the embedded judge reads
as the concept (against the exact path's share).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trasce import TraSCEPipeline
from trasce.pipeline import model_call_defaults
from trasce.runs import source_commit
from trasce.toy import world
from trasce.toy.judge import Judge
from trasce.toy.prompts import add_speed_arguments, speed_prompt_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_speed_arguments(parser, n=24)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    args = parser.parse_args()

    defaults = model_call_defaults("toy")
    steps, scale = defaults["steps"], defaults["guidance_scale"]
    sets = speed_prompt_sets(args.concept, args.n, args.seed)
    exact = TraSCEPipeline.from_pretrained("toy", concept=args.concept, preset=args.preset, lazy_tolerance=None)
    results = {"concept": args.concept, "steps": steps, "guidance_scale": scale, "settings": vars(exact.settings),
               "trasce_commit": source_commit(), "rows": []}
    judge = Judge.load()
    attribute = next(a for a, values in world.ATTRIBUTES.items() if args.concept in values)

    def concept_rate(images: torch.Tensor) -> float:
        return sum(v[attribute] == args.concept for v in judge.classify(images.clamp(-1, 1))) / len(images)

    for kind, prompts in sets.items():
        def run(pipe, prompts=prompts):
            gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
            start = time.time()
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, generator=gens, output_type="latent")
            return out, (time.time() - start) / len(prompts)

        reference, exact_seconds = run(exact)
        for tolerance in args.tolerances:
            lazy, seconds = run(exact.with_settings(lazy_tolerance=tolerance))
            diff = (lazy.images.clamp(-1, 1) - reference.images.clamp(-1, 1)) * 127.5  # 8-bit levels
            row = {"prompts": kind, "tolerance": tolerance, "images": len(prompts),
                   "max_diff_8bit": diff.abs().max().item(), "rms_diff_8bit": diff.pow(2).mean().sqrt().item(),
                   "skipped_backward": 1 - lazy.steered_steps.float().mean().item() / steps,
                   "concept_rate": concept_rate(lazy.images), "exact_concept_rate": concept_rate(reference.images),
                   "seconds_per_image": seconds, "exact_seconds_per_image": exact_seconds,
                   "pixels": world.IMAGE_SIZE ** 2}
            results["rows"].append(row)
            print(f"{kind:>12} tol {tolerance:g}: max diff {row['max_diff_8bit']:.2f} levels, rms "
                  f"{row['rms_diff_8bit']:.3f}, skipped {row['skipped_backward']:.0%}, concept "
                  f"{row['concept_rate']:.0%} (exact "
                  f"{row['exact_concept_rate']:.0%}), {seconds:.2f} vs exact {exact_seconds:.2f} s/image", flush=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
