"""Prompt fidelity of the embedded model with plain CFG, judged by the embedded judge.

    python benchmarks/toy_fidelity.py --images 200 --scales 1 2 3 5 7.5 --out fidelity.json

For each CFG scale, generates one image per *test* caption (never seen in training) and reports,
per attribute, how often the judge finds the value the caption names. Writes JSON (the sample grid
is toy_samples.py's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trasce import TraSCEPipeline
from trasce.toy import captions
from trasce.toy.judge import Judge


def fidelity(pipe: TraSCEPipeline, judge: Judge, prompts: list[str], scale: float, steps: int, seed: int,
             batch_size: int = 50) -> tuple[dict, list]:
    hits: dict[str, list[bool]] = {}
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=scale, generator=gens, output_type="pt")
        batch = out.images * 2 - 1
        images.append(batch)
        for caption, verdict in zip(chunk, judge.classify(batch), strict=True):
            for attribute, ok in captions.agreement(caption, verdict).items():
                hits.setdefault(attribute, []).append(ok)
    rates = {a: {"rate": sum(v) / len(v), "n": len(v)} for a, v in hits.items()}
    return rates, torch.cat(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fidelity.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe = TraSCEPipeline.from_pretrained(args.model, mode="none")
    judge = Judge.load()
    prompts = captions.caption_set(args.images, args.split, seed=args.seed, require=("shape",))
    results = {"model": args.model, "split": args.split, "images": len(prompts), "steps": args.steps, "scales": {}}
    for scale in args.scales:
        start = time.time()
        rates, _ = fidelity(pipe, judge, prompts, scale, args.steps, args.seed)
        rates["seconds"] = round(time.time() - start, 1)
        results["scales"][str(scale)] = rates
        print(f"CFG {scale}: " + ", ".join(f"{a} {r['rate']:.1%} (n={r['n']})" for a, r in rates.items()
                                         if isinstance(r, dict)), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
