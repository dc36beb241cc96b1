"""Red-teaming: Ring-A-Bell's prompt search, for any model that trasce wraps.

Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion
Models?", ICLR 2024) asks the text encoder alone, never the denoiser or the erasure method, which
makes its prompts a fair test of every method:

1. a *concept vector*: the mean difference between the conditionings of prompts with the concept
   and of the same prompts without it (:func:`concept_vector`);
2. for each prompt attacked, a *target*: the prompt's own conditioning plus ``strength`` times the
   concept vector;
3. a genetic search over texts of ``length`` tokens of the tokenizer's vocabulary, banned words left
   out, for the text whose conditioning is nearest the target: the mean squared difference over
   every tensor of the conditioning (:func:`search`).

:func:`run` (``trasce attack``) writes the texts found as a prompt file that ``trasce generate``
reads, with each source prompt's case, seed and CFG scale, one row as soon as it is found; a
stopped run resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trasce.data import CASE_COLUMN, READ_COLUMNS, PromptRow

#: Share of the population kept unchanged from one generation to the next (the best texts).
ELITE = 0.1
#: The columns of the file ``run`` writes, before the source file's other columns.
COLUMNS = (CASE_COLUMN, "prompt", "evaluation_seed", "evaluation_guidance", "source_prompt", "distance")
#: Pairs file columns: a prompt with the concept, and the same prompt without it.
PAIR_COLUMNS = ("with_concept", "without_concept")

Encode = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class AttackSettings:
    """``strength``: times the concept vector added to a prompt's conditioning (Ring-A-Bell's eta);
    ``length``: tokens per text searched; ``population`` texts per generation, ``generations`` rounds."""

    strength: float = 3.0
    length: int = 16
    population: int = 200
    generations: int = 300

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength):
            raise ValueError(f"strength must be a finite number, got {self.strength}")
        for name, least in (("length", 1), ("population", 2), ("generations", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")


def conditioning_rows(cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """A conditioning as one float32 row per prompt: every tensor flattened, in key order, side by side."""
    return torch.cat([cond[key].float().flatten(1) for key in sorted(cond)], dim=1)


def encoder(adapter, batch_size: int = 256) -> Encode:
    """``texts -> (N, F)`` conditioning rows through ``adapter.encode``, without gradients, in batches."""

    def encode(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([conditioning_rows(adapter.encode(texts[i:i + batch_size]))
                              for i in range(0, len(texts), batch_size)])

    return encode


def concept_vector(encode: Encode, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """The mean of ``encode(with) - encode(without)`` over ``pairs`` of prompts, a conditioning row."""
    if not pairs:
        raise ValueError("no prompt pairs to take the concept vector from")
    return (encode([a for a, _ in pairs]) - encode([b for _, b in pairs])).mean(0)


def banned_words(concept: str, extra: Sequence[str] = (), concept_words: bool = True) -> tuple[str, ...]:
    """Lower-case words no text found may hold: the concept's own (unless ``concept_words`` is false) and
    ``extra``, sorted."""
    found = set(_words(concept)) if concept_words else set()
    for word in extra:
        if not _words(word):
            raise ValueError(f"--ban takes a word, got {word!r}")
        found.update(_words(word))
    return tuple(sorted(found))


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def ban_pattern(words: Sequence[str]) -> re.Pattern | None:
    """Matches a text holding a banned word, or any word it begins ("nude": "nudes" too, not "denude")."""
    if not words:
        return None
    return re.compile(r"(?<![^\W_])(?:" + "|".join(re.escape(w) for w in words) + ")", re.IGNORECASE)


def vocabulary(tokenizer, pattern: re.Pattern | None) -> torch.Tensor:
    """Token ids a text may be made of: all but the special tokens, tokens that decode to nothing, and tokens
    that hold a banned word (``pattern``)."""
    candidates = sorted(set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids))
    texts = [text.strip() for text in tokenizer.batch_decode([[token_id] for token_id in candidates])]
    ids = [token_id for token_id, text in zip(candidates, texts, strict=True)
           if text and (pattern is None or not pattern.search(text))]
    if not ids:
        raise ValueError("the banned words leave no token of the tokenizer's vocabulary to search with")
    return torch.tensor(ids)


def search(encode: Encode, decode: Callable[[torch.Tensor], list[str]], tokens: torch.Tensor, source: str,
           target: torch.Tensor, settings: AttackSettings, generator: torch.Generator,
           pattern: re.Pattern | None = None) -> tuple[str, float]:
    """The text of ``settings.length`` tokens (from ``tokens``) whose conditioning is nearest ``target``, and
    its distance (the mean squared difference).

    A genetic search: ``population`` random texts; each generation keeps the best ``ELITE`` share and
    fills the rest with children of two parents, each the better of two drawn at random, cut at one
    random point; each child's token changes with probability ``1 / length``. A text that decodes to a
    banned word (``pattern``; tokens can join into one) is never chosen. ``decode`` turns ``(N, length)``
    token ids into texts; the distance is taken on the texts as the pipeline would encode them.
    """
    size, length = settings.population, settings.length

    def distances(genomes: torch.Tensor) -> torch.Tensor:
        texts = decode(genomes)
        found = ((encode(texts) - target) ** 2).mean(1).cpu()
        if pattern is not None:
            found[[i for i, text in enumerate(texts) if pattern.search(text)]] = math.inf
        return found

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return tokens[torch.randint(len(tokens), shape, generator=generator)]

    def parents(fitness: torch.Tensor, n: int) -> torch.Tensor:
        a, b = torch.randint(len(fitness), (2, n), generator=generator)
        return torch.where(fitness[a] <= fitness[b], a, b)

    genomes = draw((size, length))
    fitness = distances(genomes)
    keep = max(1, round(ELITE * size))
    for _ in range(settings.generations):
        order = fitness.argsort(stable=True)
        genomes, fitness = genomes[order], fitness[order]
        n = size - keep
        first, second = genomes[parents(fitness, n)], genomes[parents(fitness, n)]
        cut = torch.randint(1, length, (n, 1), generator=generator) if length > 1 else torch.ones(n, 1)
        children = torch.where(torch.arange(length) < cut, first, second)
        mutated = torch.rand(n, length, generator=generator) < 1 / length
        children = torch.where(mutated, draw((n, length)), children)
        genomes = torch.cat([genomes[:keep], children])
        fitness = torch.cat([fitness[:keep], distances(children)])
    best = int(fitness.argmin())
    if not math.isfinite(fitness[best]):
        raise ValueError(f"every text searched for {source!r} holds a banned word; ban fewer words")
    return decode(genomes[best:best + 1])[0], float(fitness[best])


def row_generator(row: PromptRow) -> torch.Generator:
    """The search's random numbers for ``row``: seeded by its case, text and seed, so that a resumed or
    reordered run finds what an unbroken one would."""
    return torch.Generator().manual_seed(zlib.crc32(f"{row.case}\0{row.prompt}\0{row.seed}".encode()))


# -- files ---------------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """``(with_concept, without_concept)`` pairs from a CSV file with those columns (``ValueError`` naming
    the file, row and column of a problem)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: the pairs file must be CSV (.csv) with columns {', '.join(PAIR_COLUMNS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"pairs file {path} does not exist") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in PAIR_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (columns: "
                         f"{', '.join(map(repr, reader.fieldnames or [])) or 'none'}); a pairs file has "
                         f"{PAIR_COLUMNS[0]!r} (a prompt with the concept) and {PAIR_COLUMNS[1]!r} (the same "
                         "prompt without it)")
    pairs = []
    for record in reader:
        row = reader.line_num
        values = tuple((record.get(column) or "").strip() for column in PAIR_COLUMNS)
        for column, value in zip(PAIR_COLUMNS, values, strict=True):
            if not value:
                raise ValueError(f"{path}, row {row}, column {column!r}: empty; every pair needs both prompts")
        pairs.append(values)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def toy_pairs(concept: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` training captions of the embedded world that name ``concept`` by its name, each paired with
    itself naming another value of the same attribute instead (drawn with ``seed``)."""
    import random

    from trasce.benchmark import concept_captions, toy_target
    from trasce.toy.captions import VOCABULARY

    attribute, value = toy_target(concept)
    rng = random.Random(seed)
    others = [v for v in VOCABULARY[attribute] if v != value]
    name = re.compile(rf"(?<![\w-]){re.escape(value)}(?![\w-])")
    captions, _ = concept_captions(n, 0, "train", seed, attribute, value)
    return [(caption, name.sub(lambda _: rng.choice(others), caption)) for caption in captions]


def written_rows(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an attack file already written, by case."""
    with path.open(encoding="utf-8", newline="") as file:
        return {record[CASE_COLUMN]: record for record in csv.DictReader(file)}


def render(records: Sequence[dict[str, str]], extra: Sequence[str]) -> bytes:
    """The attack file's CSV text: ``COLUMNS`` then ``extra``, one line per record."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue().encode("utf-8")


def record(row: PromptRow, text: str, distance: float) -> dict[str, str]:
    """One row of the attack file: ``text`` found for ``row``, at ``distance`` from its target."""
    return {CASE_COLUMN: row.case, "prompt": text, "evaluation_seed": str(row.seed),
            "evaluation_guidance": repr(float(row.guidance_scale)), "source_prompt": row.prompt,
            "distance": f"{distance:.6g}",
            **{key: value for key, value in row.extra.items() if key not in COLUMNS and key not in READ_COLUMNS}}


# -- the command ---------------------------------------------------------------------------------


@dataclass
class AttackOptions:
    """Everything ``trasce attack`` takes; field names are the CLI's options."""

    out: Path
    model: str = "toy"
    concept: str | None = None
    preset: str | None = None
    prompts: Path | None = None
    prompt_column: str | None = None
    pairs: Path | None = None
    n_prompts: int = 24
    n_pairs: int = 50
    ban: tuple[str, ...] = ()
    allow_concept_words: bool = False
    strength: float = 3.0
    length: int | None = None  # None: 16 tokens, fewer where the tokenizer takes fewer
    population: int = 200
    generations: int = 300
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    quiet: bool = False
    overwrite: bool = False


def settings_file(out: Path) -> Path:
    """Where ``run`` records what made ``out``: beside it, ``out`` + ``.json``."""
    return out.with_name(out.name + ".json")


def run(options: AttackOptions) -> dict:
    """Write ``options.out``: for each prompt, the text found; resumes a file made with the same settings.

    Returns what the settings file records, with ``rows`` (the records written) added.
    """
    from tqdm.auto import tqdm

    from trasce import data, presets
    from trasce.generate import check_counts, hide_loading_bars, pick_device, pick_dtype
    from trasce.models import adapter_for
    from trasce.pipeline import is_toy_model, load_diffusers_pipeline, model_call_defaults
    from trasce.runs import atomic_write_bytes, package_versions, source_commit

    out = Path(options.out)
    if out.suffix.lower() != ".csv":
        raise ValueError(f"--out {out}: the attack writes a prompt file; give it a .csv name")
    check_counts({"--n-prompts": options.n_prompts, "--n-pairs": options.n_pairs,
                  "--population": options.population, "--generations": options.generations})
    concept = presets.resolve(options.preset, options.concept, None, None, None)[0]
    toy = is_toy_model(options.model)
    if not toy and (options.prompts is None or options.pairs is None):
        raise ValueError("on a model other than the embedded one, give --prompts (the prompts to rewrite, e.g. the "
                         "nudity rows of I2P) and --pairs (a CSV of prompts with and without the concept)")
    guidance = float(model_call_defaults(options.model)["guidance_scale"])
    if options.prompts is not None:
        rows = data.read_prompts(options.prompts, default_seed=options.seed, default_guidance=guidance,
                                 prompt_column=options.prompt_column)
    else:
        rows = toy_rows(concept, options.n_prompts, options.seed, guidance)
    pairs = read_pairs(options.pairs) if options.pairs is not None else toy_pairs(concept, options.n_pairs,
                                                                                   options.seed)
    banned = banned_words(concept, options.ban, concept_words=not options.allow_concept_words)
    pattern = ban_pattern(banned)

    device = pick_device(options.device)
    hide_loading_bars()
    pipe = load_diffusers_pipeline(options.model, torch_dtype=pick_dtype(options.dtype, device)).to(device)
    tokenizer = pipe.tokenizer
    most = tokenizer.model_max_length - 2  # the start and end tokens
    length = options.length if options.length is not None else min(16, most)
    if not 1 <= length <= most:
        raise ValueError(f"--length {length}: this model's tokenizer takes 1 to {most} tokens besides its start and "
                         "end tokens")
    settings = AttackSettings(options.strength, length, options.population, options.generations)

    recorded = {
        "attack": "Ring-A-Bell (genetic search on the text encoder)",
        "model": str(options.model),
        "concept": concept,
        "banned": list(banned),
        "settings": asdict(settings),
        "pairs": {"file": None if options.pairs is None else str(options.pairs), "count": len(pairs),
                  "sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()},
        "prompts": {"file": None if options.prompts is None else str(options.prompts), "count": len(rows),
                    "sha256": hashlib.sha256(json.dumps([(r.case, r.prompt, r.seed, r.guidance_scale)
                                                         for r in rows]).encode()).hexdigest()},
    }
    done = _resume(out, recorded, options.overwrite)
    encode = encoder(adapter_for(pipe))
    vector = concept_vector(encode, pairs)
    # Every source prompt lies this far from its target (strength times the concept vector away).
    recorded.update(source_distance=float((settings.strength * vector).pow(2).mean()), versions=package_versions(),
                    commit=source_commit())
    atomic_write_bytes(settings_file(out), (json.dumps(recorded, indent=2) + "\n").encode())
    tokens = vocabulary(tokenizer, pattern)
    extra = [key for key in dict.fromkeys(k for row in rows for k in row.extra)
             if key not in COLUMNS and key not in READ_COLUMNS]
    records = {case: done[case] for case in (row.case for row in rows) if case in done}

    def decode(genomes: torch.Tensor) -> list[str]:
        return [text.strip() for text in tokenizer.batch_decode(genomes.tolist(), skip_special_tokens=True)]

    todo = [row for row in rows if row.case not in records]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="attack", unit="prompt", disable=options.quiet)
    for row in todo:
        target = encode([row.prompt])[0] + settings.strength * vector
        text, distance = search(encode, decode, tokens, row.prompt, target, settings, row_generator(row), pattern)
        records[row.case] = record(row, text, distance)
        atomic_write_bytes(out, render([records[r.case] for r in rows if r.case in records], extra))
        bar.update()
    bar.close()
    return {**recorded, "rows": [records[r.case] for r in rows]}


def toy_rows(concept: str, n: int, seed: int, guidance: float) -> list[PromptRow]:
    """The embedded world's prompts to attack: the benchmark's test captions naming ``concept`` by its
    name (``target-name``), with the benchmark's cases and seeds, so that their images compare one to one."""
    from trasce.benchmark import toy_prompt_sets, toy_target

    attribute, value = toy_target(concept)
    sets = toy_prompt_sets(concept, attribute, value, "test", seed, n_target=n, n_corner=1, n_other=1,
                           guidance=guidance)
    return [PromptRow(case=p.case, prompt=p.prompt, seed=p.seed, guidance_scale=p.guidance_scale, row=i + 1)
            for i, p in enumerate(sets["target-name"])]


def _resume(out: Path, recorded: dict, overwrite: bool) -> dict[str, dict[str, str]]:
    """The rows ``out`` holds from a run with the same settings (none with ``overwrite``); ``ValueError`` when
    ``out`` exists and was made otherwise."""
    sidecar = settings_file(out)
    if overwrite or not out.exists():
        return {}
    if not sidecar.exists():
        raise ValueError(f"{out} exists, and {sidecar}, which would say how it was made, does not; give another "
                         "--out, or --overwrite to replace it")
    try:
        before = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{sidecar} is not valid JSON ({error.msg} at line {error.lineno}); give another --out, or "
                         "--overwrite to start again") from error
    for key, value in recorded.items():
        if before.get(key) != json.loads(json.dumps(value)):
            raise ValueError(f"{out} was made with other settings: {key} was {json.dumps(before.get(key))}, now "
                             f"{json.dumps(value)}; give the same arguments to resume, another --out, or "
                             "--overwrite to start again")
    return written_rows(out)
