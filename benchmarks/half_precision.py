"""How faithfully fp16 and bf16 reproduce fp32's steering, on the embedded model.

    python benchmarks/half_precision.py --out half-precision.json

The steering effect of an image is its final image under exact TraSCE minus its final image under
part 1 alone (``negation``), from the same noise: what part 2 changed. It is measured in fp32 and in
each half precision, and the script reports, per image, how far the half-precision effect lies from
fp32's (relative L2), with fp32's effect in 8-bit levels (RMS) beside it. An effect of a fraction
of a level is easily swamped by rounding, so read the images with the largest effects first.
``--label`` names the code being measured in the JSON (e.g. where the latents are held).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trasce import TraSCEPipeline
from trasce.generate import hide_loading_bars

PROMPTS = (
    "a red circle", "a striped blue disc", "a round shape", "circle", "a green circle on a black background",
    "an outlined orange ring", "a yellow star", "a green square",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def final_images(dtype: torch.dtype, mode: str, noise: torch.Tensor, steps: int, concept: str) -> torch.Tensor:
    pipe = TraSCEPipeline.from_pretrained("toy", torch_dtype=dtype, concept=concept, preset="toy-shape",
                                          lazy_tolerance=None, mode=mode)
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe(list(PROMPTS), num_inference_steps=steps, guidance_scale=1.5, latents=noise.clone(),
                output_type="pt").images.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="what code is measured, recorded in the JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    hide_loading_bars()

    noise = torch.randn(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    effects = {name: final_images(dtype, "trasce", noise, args.steps, args.concept)
               - final_images(dtype, "negation", noise, args.steps, args.concept) for name, dtype in DTYPES.items()}
    reference = effects["fp32"]
    size = reference.flatten(1).norm(dim=1)
    result = {"model": "toy", "concept": args.concept, "steps": args.steps, "seed": args.seed, "label": args.label,
              "torch": torch.__version__, "prompts": list(PROMPTS),
              "fp32_effect_rms_levels": [round(float(v) * 255, 3) for v in reference.flatten(1).pow(2).mean(1).sqrt()],
              "relative_error": {}}
    for name in ("bf16", "fp16"):
        error = (effects[name] - reference).flatten(1).norm(dim=1) / size.clamp_min(1e-12)
        result["relative_error"][name] = [None if s == 0 else round(float(e), 3)
                                          for e, s in zip(error, size, strict=True)]
    for i, prompt in enumerate(PROMPTS):
        print(f"{prompt:<40} fp32 effect {result['fp32_effect_rms_levels'][i]:7.3f} levels; relative error "
              + ", ".join(f"{name} {result['relative_error'][name][i]}" for name in ("bf16", "fp16")), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
