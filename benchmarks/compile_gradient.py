"""Does ``torch.compile`` keep TraSCE's steering gradient? And what may the compiled-gradient check compare?

    python benchmarks/compile_gradient.py --model toy --dtypes fp32 bf16 fp16 --out compile.json

For each dtype, four prompts (two near the concept) at four timesteps go through the denoiser's
prompt and concept branches, eager and compiled by inductor (default mode). Printed and written,
as relative L2 differences:

- ``compiled``: compiled against eager in the same dtype, for the steering gradient ``dd/dx`` and
  for a random vector-Jacobian product of the same call (what ``trasce.sampler.GradientCheck``
  compares), with the gradients' norms;
- ``rounding`` (half precision only): eager in that dtype against eager fp32, for the batch and
  for the worst single image. It is how far a correct half-precision pass may move each quantity.

``--model`` is ``toy`` (the embedded model) or a random architecture of ``trasce.models.random``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trasce import TraSCEPipeline
from trasce.models import random as random_models
from trasce.pipeline import DTYPES
from trasce.sampler import cat_cond

PROMPTS = {"toy": ["a red circle on grass", "a circle", "a blue square", "a round shape"]}
TIMESTEPS = (961, 601, 301, 41)


def gradients(adapter, x0: torch.Tensor, cond, vector: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """``dd/dx`` and the random product's gradient at each timestep, in float32."""
    out = {"steering": [], "random product": []}
    for t in TIMESTEPS:
        for name in out:
            x = x0.clone().requires_grad_(True)
            pred = adapter.denoise(torch.cat([x, x]), torch.tensor(t), cond).float()
            if name == "steering":
                p, c = pred.chunk(2)
                objective = (p - c).flatten(1).norm(dim=1).sum()
            else:
                objective = (pred * vector).sum()
            out[name].append(torch.autograd.grad(objective, x)[0].float())
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    prompts = PROMPTS.get(args.model, ["a photo of a lake", "a nude", "a red car", "naked"])
    eager, rows = {}, []
    for dtype in ["fp32"] + [d for d in args.dtypes if d != "fp32"]:
        if args.model == "toy":
            pipe = TraSCEPipeline.from_pretrained("toy", concept=args.concept, torch_dtype=DTYPES[dtype]).pipe
        else:
            pipe = random_models.build(args.model, dtype=DTYPES[dtype])
        adapter = TraSCEPipeline.from_pipe(pipe, concept=args.concept).adapter
        adapter.denoiser_module.requires_grad_(False)
        with torch.no_grad():
            cond = cat_cond(adapter.encode(prompts), adapter.encode([args.concept] * len(prompts)))
        shape = (len(prompts), *adapter.latent_shape(*adapter.default_size()))
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
        vector = torch.randn((2 * shape[0], *shape[1:]), generator=torch.Generator().manual_seed(1))
        eager[dtype] = gradients(adapter, x0, cond, vector)
        setattr(pipe, adapter.denoiser_attribute, torch.compile(adapter.denoiser_module))
        compiled = gradients(adapter, x0, cond, vector)
        for name, grads in eager[dtype].items():
            row = {"dtype": dtype, "quantity": name,
                   "compiled": [relative(c, e) for c, e in zip(compiled[name], grads, strict=True)],
                   "eager_norm": [float(g.norm()) for g in grads],
                   "compiled_norm": [float(g.norm()) for g in compiled[name]]}
            if dtype != "fp32":
                reference = eager["fp32"][name]
                row["rounding"] = [relative(g, r) for g, r in zip(grads, reference, strict=True)]
                row["rounding_worst_image"] = [max(relative(g[i], r[i]) for i in range(len(g)))
                                               for g, r in zip(grads, reference, strict=True)]
            rows.append(row)
            print(f"{dtype} {name:<14} " + ", ".join(f"{k} {' / '.join(f'{v:.3g}' for v in row[k])}"
                                                   for k in ("compiled", "rounding", "rounding_worst_image")
                                                   if k in row), flush=True)
        torch._dynamo.reset()
    result = {"model": args.model, "concept": args.concept, "prompts": prompts, "timesteps": TIMESTEPS,
              "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
