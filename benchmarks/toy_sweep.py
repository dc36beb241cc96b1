"""Choose the embedded model's TraSCE settings on *validation* captions (never the test ones).

    python benchmarks/toy_sweep.py --concept circle --out sweep-circle.json
    python benchmarks/toy_sweep.py --concept striped --out sweep-striped.json

For each (sigma, loss_scale) on the grid, generates the validation prompts that ask for the
concept (by name and by alias) and prompts that ask for other values of the same attribute, and
reports the concept's rate on the first and the prompted-value agreement on the second. The
chosen setting is the one with the lowest target rate whose fidelity stays within 5 points of
plain generation or of part 1 alone, whichever is lower; ``presets.py`` records it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trasce import TraSCEPipeline
from trasce.eval.toy import toy_concept
from trasce.pipeline import model_call_defaults
from trasce.toy import captions
from trasce.toy.judge import Judge
from trasce.toy.prompts import prompt_sets


def measure(pipe: TraSCEPipeline, judge: Judge, sets: dict[str, list[str]], attribute: str, value: str,
            steps: int, scale: float, seed: int) -> dict:
    result = {}
    for name, prompts in sets.items():
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        start = time.time()
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, generator=gens, output_type="pt")
        verdicts = judge.classify(out.images * 2 - 1)
        hits = [v[attribute] == value for v in verdicts]
        agree = [captions.agreement(p, v).get(attribute, False) for p, v in zip(prompts, verdicts, strict=True)]
        result[name] = {"concept_rate": sum(hits) / len(hits), "fidelity": sum(agree) / len(agree),
                        "n": len(prompts), "seconds_per_image": (time.time() - start) / len(prompts)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", required=True)
    parser.add_argument("--n", type=int, default=16, help="prompts per set")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--configs", nargs="+", default=["0.3:3", "0.6:3", "1.2:3", "0.6:8"],
                        help="sigma:loss_scale pairs to try (step size 1)")
    parser.add_argument("--window", type=float, nargs=2, default=(0.0, 1.0),
                        help="fraction of the steps (start end) in which steering applies")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    defaults = model_call_defaults("toy")
    steps = args.steps or defaults["steps"]
    scale = args.guidance_scale or defaults["guidance_scale"]
    attribute, value = toy_concept(args.concept)
    sets = prompt_sets(args.concept, args.n, "val", args.seed)
    judge = Judge.load()
    base = TraSCEPipeline.from_pretrained("toy", concept=args.concept)
    runs = []
    grid = [tuple(float(v) for v in c.split(":")) for c in args.configs]
    for mode, sigma, loss_scale in [("none", None, None), ("negation", None, None)] + [
            ("trasce", s, ls) for s, ls in grid]:
        changes = {} if sigma is None else {"sigma": sigma, "loss_scale": loss_scale,
                                            "steer_window": tuple(args.window)}
        pipe = base.with_settings(mode=mode, **changes)
        result = measure(pipe, judge, sets, attribute, value, steps, scale, args.seed)
        runs.append({"mode": mode, "sigma": sigma, "loss_scale": loss_scale, "step_size": 1.0,
                     "steer_window": list(args.window), "lazy_tolerance": pipe.settings.lazy_tolerance, **result})
        print(f"{mode:>9} sigma={sigma} loss_scale={loss_scale}: target {result['target']['concept_rate']:.0%}, "
              f"other fidelity {result['other']['fidelity']:.0%}", flush=True)

    # Part 1 alone may already cost fidelity (it changes every prompt's guidance direction); the
    # steering settings are held to within 5 points of whichever of plain and part 1 is lower.
    floor = min(runs[0]["other"]["fidelity"], runs[1]["other"]["fidelity"]) - 0.05
    eligible = [r for r in runs if r["mode"] == "trasce" and r["other"]["fidelity"] >= floor - 1e-9]
    chosen = min(eligible, key=lambda r: (r["target"]["concept_rate"], -r["other"]["fidelity"]), default=None)
    report = {"concept": args.concept, "attribute": attribute, "split": "val", "steps": steps,
              "guidance_scale": scale, "prompts": sets, "runs": runs, "chosen": chosen}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("chosen:", None if chosen is None else {k: chosen[k] for k in ("sigma", "loss_scale", "step_size")})


if __name__ == "__main__":
    main()
