"""Captions for the toy world, and the word-level vocabulary its text encoder reads.

Every attribute value has a *name* and *aliases* (synonyms and descriptions), so that a concept
can be asked for without its name: a circle is also "a disc" or "a round shape". Captions come
from templates that mention a random subset of the attributes, with a random alias for each.

The split is by caption string: ``split_of(caption)`` hashes it into train (80 %), validation
(10 %) or test (10 %). Training only ever draws train captions, so every test caption is a
wording the model never saw, though its words and attribute values all occur in training.
"""

from __future__ import annotations

import random
import re
import zlib

from trasce.toy.world import ATTRIBUTES

# name first; the rest are aliases. A phrase may be several words.
VOCABULARY: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc", "round shape", "disk", "round blob"),
        "square": ("square", "box", "four-sided shape", "block"),
        "triangle": ("triangle", "three-sided shape", "pyramid shape", "wedge"),
        "star": ("star", "five-pointed shape", "pointy star shape", "starfish shape"),
        "cross": ("cross", "plus sign", "plus shape", "swiss cross"),
    },
    "color": {
        "red": ("red", "crimson", "scarlet", "cherry-colored"),
        "green": ("green", "emerald", "grass-colored", "lime"),
        "blue": ("blue", "azure", "cobalt", "sky-colored"),
        "yellow": ("yellow", "golden", "lemon", "sunny"),
        "purple": ("purple", "violet", "lilac", "plum-colored"),
        "orange": ("orange", "tangerine", "amber", "pumpkin-colored"),
    },
    "fill": {
        "solid": ("solid", "filled", "painted", "full"),
        "striped": ("striped", "stripy", "banded", "lined"),
        "outlined": ("outlined", "hollow", "empty", "line-drawn"),
    },
    "background": {
        "black": ("black", "dark", "night-black", "inky"),
        "white": ("white", "bright", "snowy", "paper-white"),
        "gray": ("gray", "grey", "ashen", "slate"),
    },
}

TEMPLATES = (
    "a {color} {shape}",
    "a {fill} {color} {shape}",
    "a {fill} {color} {shape} on a {background} background",
    "a {color} {shape} on a {background} background",
    "a {fill} {shape}",
    "a {shape}",
    "a {shape} on {background}",
    "{color} {fill} {shape} against a {background} backdrop",
    "a picture of a {color} {shape}",
    "an image of a {fill} {shape} on a {background} background",
    "{shape}, {color}, {fill}",
    "a drawing of a {fill} {shape} in {color}",
    "{color}",
    "{fill}",
    "a {background} background",
)

MAX_WORDS = 16  # the tokenizer pads and truncates to this many tokens (with bos/eos)
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|[,]")


def words(text: str) -> list[str]:
    """Lower-case word split used by the tokenizer: hyphenated words stay one token."""
    return _WORD.findall(text.lower())


def vocabulary_words() -> list[str]:
    """Every word the templates and aliases can produce, sorted, without special tokens."""
    found: set[str] = set()
    for template in TEMPLATES:
        found.update(words(re.sub(r"\{\w+\}", " ", template)))
    for values in VOCABULARY.values():
        for aliases in values.values():
            for alias in aliases:
                found.update(words(alias))
    for attribute, values in ATTRIBUTES.items():
        assert tuple(VOCABULARY[attribute]) == values, f"vocabulary out of sync for {attribute}"
    return sorted(found)


def split_of(caption: str) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a caption, by a stable hash of its text."""
    bucket = zlib.crc32(caption.strip().lower().encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def caption_for(labels: dict[str, int], rng: random.Random, split: str = "train",
                aliases: bool = True, tries: int = 64) -> str:
    """A caption of ``split`` consistent with ``labels`` (attribute -> value index).

    Draws a template and aliases until the caption lands in ``split``; returns ``""`` (the
    unconditional caption) if none does within ``tries``.
    """
    for _ in range(tries):
        template = rng.choice(TEMPLATES)
        fields = {}
        for attribute, values in ATTRIBUTES.items():
            options = VOCABULARY[attribute][values[labels[attribute]]]
            fields[attribute] = rng.choice(options) if aliases else options[0]
        caption = template.format(**fields)
        if split_of(caption) == split:
            return caption
    return ""


def mentioned(caption: str) -> dict[str, str]:
    """Which attribute values a caption names, by name or alias: ``{"shape": "circle", ...}``.

    Matches whole words; longer aliases win over their prefixes ("plus sign" before "plus").
    """
    text = " " + " ".join(words(caption)) + " "
    found: dict[str, str] = {}
    for attribute, values in VOCABULARY.items():
        best = None
        for value, aliases in values.items():
            for alias in aliases:
                phrase = " " + " ".join(words(alias)) + " "
                if phrase in text and (best is None or len(alias) > best[1]):
                    best = (value, len(alias))
        if best is not None:
            found[attribute] = best[0]
    return found


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary_words` (diffusers accepts it)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK, *vocabulary_words()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(",", behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_WORDS,
    )


def caption_set(n: int, split: str, seed: int = 0, require: tuple[str, ...] = ("shape",),
                fixed: dict[str, int] | None = None, aliases: bool = True) -> list[str]:
    """``n`` distinct captions of ``split`` that mention every attribute in ``require``.

    Labels are drawn uniformly (``fixed`` pins some, e.g. ``{"shape": 0}``), so the set covers
    the world evenly; used to build the validation and test prompt sets.
    """
    rng = random.Random(seed)
    found: list[str] = []
    seen: set[str] = set()
    for _ in range(n * 400):
        if len(found) == n:
            break
        labels = {a: rng.randrange(len(v)) for a, v in ATTRIBUTES.items()}
        labels.update(fixed or {})
        caption = caption_for(labels, rng, split, aliases=aliases and rng.random() < 0.5)
        said = mentioned(caption)
        if caption and caption not in seen and all(a in said for a in require):
            seen.add(caption)
            found.append(caption)
    if len(found) < n:
        raise ValueError(f"only {len(found)} distinct {split} captions mention {require}; asked for {n}")
    return found


def agreement(caption: str, verdict: dict[str, str]) -> dict[str, bool]:
    """For each attribute the caption names, whether the judge's verdict has that value."""
    return {attribute: verdict.get(attribute) == value for attribute, value in mentioned(caption).items()}
