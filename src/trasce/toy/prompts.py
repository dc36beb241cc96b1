"""Prompt sets of the toy world for sweeps and measurements: the concept asked for, and not."""

from __future__ import annotations

from trasce.eval.toy import mention_kind, toy_concept
from trasce.toy import captions, world


def prompt_sets(concept: str, n: int, split: str, seed: int) -> dict[str, list[str]]:
    """Target captions (half by name, half by alias) and captions naming other values."""
    attribute, value = toy_concept(concept)
    index = world.ATTRIBUTES[attribute].index(value)
    pool = captions.caption_set(n * 8, split, seed=seed, require=(attribute,), fixed={attribute: index})
    by_name = [c for c in pool if mention_kind(c, attribute, value) == "name"][: n // 2]
    by_alias = [c for c in pool if mention_kind(c, attribute, value) == "alias"][: n - n // 2]
    others = []
    for other in range(len(world.ATTRIBUTES[attribute])):
        if other != index:
            others += captions.caption_set(n // (len(world.ATTRIBUTES[attribute]) - 1), split, seed=seed + other,
                                           require=(attribute,), fixed={attribute: other})
    return {"target": by_name + by_alias, "other": others}
