"""Prompt sets of the toy world for sweeps and measurements: the concept asked for, and not.

They are the benchmark's own sets (``trasce.benchmark.toy_prompt_sets``), so that settings
swept on validation captions and the table computed on test captions use one construction.
"""

from __future__ import annotations


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
