"""Red-teaming the embedded model: Ring-A-Bell prompts (``trasce attack``) against each erasure method.

    python benchmarks/toy_attack.py --concept circle --work runs/toy-attack --out attack-circle.json
    python benchmarks/toy_attack.py --concept circle --ban disc --ban disk --ban round --ban blob \\
        --work runs/toy-attack-no-alias --out attack-circle-no-alias.json

Runs the README's loop: ``trasce attack`` rewrites the benchmark's test captions that name the concept
(``target-name``), without the concept's words (and ``--ban``'s); then, for the source captions and the
prompts found, each method generates one image per prompt with the prompt's seed (``trasce generate``:
the same noise for both sets) and the toy judge gives the share of images showing the concept
(``trasce evaluate``'s target rate, with its 95 % Wilson interval). A third set is the control: per
prompt, a random text of the same number of tokens drawn from the words the search may use, with no
search, which tells what the attack's texts owe to the search and what to the model's habits on
texts without a shape. Everything lands in ``--work`` and resumes; ``--out`` gets the numbers, the
prompts, the attack's settings and the search's time (measured when it ran: a resumed run keeps the
measurement of a search that ran in one go, and none is recorded for one that was stopped).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import torch

from trasce import attack as ring_a_bell
from trasce.attack import AttackOptions
from trasce.attack import run as attack
from trasce.benchmark import PRESET_FOR_ATTRIBUTE, toy_target
from trasce.eval.evaluate import evaluate_folder
from trasce.generate import GenerateOptions
from trasce.generate import run as generate
from trasce.pipeline import load_diffusers_pipeline
from trasce.runs import source_commit

METHODS = ("none", "negative_prompt", "negation", "trasce")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="circle", help="a value of the toy world")
    parser.add_argument("--ban", action="append", default=[], help="a word the prompts may not hold, besides the "
                                                                    "concept's (repeatable)")
    parser.add_argument("--n", type=int, default=24, help="prompts")
    parser.add_argument("--strength", type=float, default=3.0)
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--generations", type=int, default=150)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, required=True, help="folder for the prompt file and the images")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        attribute, _ = toy_target(args.concept)
    except ValueError as error:
        parser.error(str(error))

    options = AttackOptions(out=args.work / "attack", concept=args.concept, n_prompts=args.n, ban=tuple(args.ban),
                            strength=args.strength, population=args.population, generations=args.generations,
                            seed=args.seed, quiet=True)
    timings = args.work / "attack-seconds.json"  # the search's time when it ran in one go, kept for later runs
    fresh = not options.out.exists()
    start = time.perf_counter()
    found = attack(options)
    if fresh:
        timings.write_text(json.dumps({"seconds": time.perf_counter() - start, "prompts": len(found["rows"]),
                                       "machine": platform.processor() or platform.machine(),
                                       "cpus": os.cpu_count()}))
    prompts = Path(found["file"])
    controls = random_texts(found)
    sets = {"source": args.work / "source.csv", "attack": prompts, "random": args.work / "random.csv"}
    for name, texts in (("source", [r["source_prompt"] for r in found["rows"]]), ("random", controls)):
        with sets[name].open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance"])
            writer.writerows([r["case_number"], text, r["evaluation_seed"], r["evaluation_guidance"]]
                             for r, text in zip(found["rows"], texts, strict=True))

    preset = PRESET_FOR_ATTRIBUTE.get(attribute, "toy-shape")
    rows = []
    for method in METHODS:
        row = {"method": method}
        for name, path in sets.items():
            folder = args.work / method / name
            generate(GenerateOptions(out=folder, concept=args.concept, preset=preset, prompts=path, mode=method,
                                     quiet=True))
            summary = evaluate_folder(folder, "toy", quiet=True)
            row[name] = summary["target"]["all"]
        rows.append(row)
        print(f"{method}: " + ", ".join(f"{name} {row[name]['rate']:.0%}" for name in sets), flush=True)

    report = {"concept": args.concept, "preset": preset, "attack": found["settings"], "commit": source_commit(),
              "attack_time": json.loads(timings.read_text()) if timings.exists() else None,
              "prompts": found["rows"], "random": controls,
              "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def random_texts(found: dict) -> list[str]:
    """Per attacked prompt, a text of as many tokens as the search's, drawn at random from the tokens it may
    use (the same banned words), seeded by the row."""
    from trasce.data import PromptRow

    tokenizer = load_diffusers_pipeline("toy").tokenizer
    tokens = ring_a_bell.vocabulary(tokenizer, ring_a_bell.ban_pattern(found["settings"]["banned"]))
    texts = []
    for r in found["rows"]:
        row = PromptRow(case=r["case_number"], prompt=r["source_prompt"], seed=int(r["evaluation_seed"]),
                        guidance_scale=float(r["evaluation_guidance"]), row=0)
        length = len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])  # the search's texts' length
        draw = torch.randint(len(tokens), (length,), generator=ring_a_bell.row_generator(row))
        texts.append(tokenizer.decode(tokens[draw].tolist()).strip())
    return texts


if __name__ == "__main__":
    main()
