"""Two concepts erased at once, named in one text ("circle, star"), on the embedded model's test captions.

    python benchmarks/toy_two_concepts.py --concepts circle star --n 24 --out two-concepts-circle-star.json
    python benchmarks/toy_two_concepts.py --concepts circle striped --n 24 --out two-concepts-circle-striped.json

TraSCE steers away from one concept text per image; the published nudity preset names nine words in
one comma-separated text. This measures whether that way of naming several concepts erases each of
them as well as erasing it alone does. Prompt sets: captions naming concept A (by name or alias),
captions naming concept B, and captions naming neither (another value of A's attribute). Methods:
plain CFG, TraSCE on A alone, on B alone, and on "A, B". Reported: the judge's rate of A on A's
captions, of B on B's, and on the other captions the share whose named values of A's and B's
attributes the judge finds (fidelity). Same seeds for every method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trasce import TraSCEPipeline
from trasce.benchmark import PRESET_FOR_ATTRIBUTE, toy_target
from trasce.pipeline import model_call_defaults
from trasce.toy.captions import agreement, mentioned
from trasce.toy.judge import Judge
from trasce.toy.prompts import prompt_sets


def prompt_sets_of_two(a: str, b: str, n: int, seed: int) -> dict[str, list[str]]:
    """Test captions naming ``a``, naming ``b``, and naming neither (``n`` each, fewer for the last if the
    caption pool runs short)."""
    (attr_a, value_a), (attr_b, value_b) = toy_target(a), toy_target(b)
    others = prompt_sets(a, 2 * n, "test", seed)["other"]
    neither = [c for c in others if mentioned(c).get(attr_a) != value_a and mentioned(c).get(attr_b) != value_b]
    return {a: prompt_sets(a, n, "test", seed)["target"], b: prompt_sets(b, n, "test", seed + 1)["target"],
            "neither": neither[:n]}


def generate(pipe: TraSCEPipeline, prompts: list[str], steps: int, scale: float, seed: int) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=scale, generator=generators,
                output_type="pt").images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", nargs=2, default=["circle", "star"], metavar=("A", "B"),
                        help="two values of the toy world (shapes, colours, fills or backgrounds)")
    parser.add_argument("--n", type=int, default=24, help="captions per prompt set")
    parser.add_argument("--seed", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    a, b = args.concepts
    try:
        targets = {a: toy_target(a), b: toy_target(b)}
    except ValueError as error:
        parser.error(str(error))
    attributes = {attribute for attribute, _ in targets.values()}
    defaults = model_call_defaults("toy")
    steps, scale = defaults["steps"], defaults["guidance_scale"]
    preset = PRESET_FOR_ATTRIBUTE.get(targets[a][0], "toy-shape")
    sets = prompt_sets_of_two(a, b, args.n, args.seed)
    judge = Judge.load()
    base = TraSCEPipeline.from_pretrained("toy", concept=a, preset=preset)
    methods = {"none": base.with_settings(mode="none"), f"trasce {a}": base,
               f"trasce {b}": base.with_settings(concept=b),
               f"trasce {a}, {b}": base.with_settings(concept=f"{a}, {b}")}

    rows = []
    for method, pipe in methods.items():
        row = {"method": method}
        for name, prompts in sets.items():
            verdicts = judge.classify(generate(pipe, prompts, steps, scale, args.seed) * 2 - 1)
            if name in targets:
                attribute, value = targets[name]
                row[f"{name} rate"] = sum(v[attribute] == value for v in verdicts) / len(verdicts)
            else:
                kept = [all(ok for attribute, ok in agreement(p, v).items() if attribute in attributes)
                        for p, v in zip(prompts, verdicts, strict=True)]
                row["neither fidelity"] = sum(kept) / len(kept)
        rows.append(row)
        print(" | ".join(f"{v:.0%}" if isinstance(v, float) else v for v in row.values()), flush=True)

    report = {"concepts": [a, b], "preset": preset, "settings": {
                  k: getattr(base.settings, k) for k in ("loss_scale", "step_size", "sigma", "lazy_tolerance")},
              "steps": steps, "guidance_scale": scale, "seed": args.seed, "prompts": sets, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
