"""Prompt sets of the toy world for sweeps and measurements: the concept asked for, and not.

They are the benchmark's own sets (``trasce.benchmark.toy_prompt_sets``), so that settings
swept on validation captions and the table computed on test captions use one construction.
"""

from __future__ import annotations

from pathlib import Path


def prompt_sets(concept: str, n: int, split: str, seed: int) -> dict[str, list[str]]:
    """``target``: ``n`` captions naming the concept (half by name, half by alias); ``other``: ``n``
    captions naming another value of the concept's attribute."""
    from trasce.benchmark import toy_prompt_sets
    from trasce.eval.toy import toy_concept

    attribute, value = toy_concept(concept)
    sets = toy_prompt_sets(concept, attribute, value, split, seed, n_target=n - n // 2, n_corner=1, n_other=n,
                           guidance=1.0)
    name = [p.prompt for p in sets["target-name"]][: n // 2]
    alias = [p.prompt for p in sets["target-alias"]][: n - n // 2]
    return {"target": name + alias, "other": [p.prompt for p in sets["other"]]}


def speed_prompt_sets(concept: str, n: int, seed: int) -> dict[str, list[str]]:
    """The speed measurements' test captions: ``concept-near`` (the concept by name or alias) and
    ``benign`` (another value of its attribute), ``n`` each."""
    sets = prompt_sets(concept, n, "test", seed)
    return {"concept-near": sets["target"], "benign": sets["other"]}


def add_speed_arguments(parser, n: int) -> None:
    """The arguments every speed measurement on the embedded model takes (``argparse``)."""
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--preset", default="toy-shape")
    parser.add_argument("--n", type=int, default=n, help="test captions per set, generated as one batch")
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
