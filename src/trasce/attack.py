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

:func:`run` (``trasce attack``) writes the texts found into ``OUT/prompts.csv``, a prompt file that
``trasce generate`` reads, with each source prompt's case, seed and CFG scale, one row as soon as it
is found; ``OUT/run.json`` holds the settings, and a stopped run resumes.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from trasce.data import CASE_COLUMN, READ_COLUMNS, PromptFileError, PromptRow, read_columns, read_prompts

#: Share of the population kept unchanged from one generation to the next (the best texts).
ELITE = 0.1
#: The columns of the file ``run`` writes, before the source file's other columns.
COLUMNS = (CASE_COLUMN, "prompt", "evaluation_seed", "evaluation_guidance", "source_prompt", "distance",
           "source_distance")
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
                raise ValueError(f"{name} must be at least {least}, got {value!r}")


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


#: Words of a concept's text that are not banned from the prompts: they carry no concept ("a disc").
FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "and", "or", "with", "by", "to", "for", "at", "as",
                            "from"})


def banned_words(concept: str, extra: Sequence[str] = (), concept_words: bool = True) -> tuple[str, ...]:
    """Lower-case words no text found may hold, sorted: the concept's own but ``FUNCTION_WORDS`` (unless
    ``concept_words`` is false) and ``extra``'s."""
    found = {w for w in _words(concept) if w not in FUNCTION_WORDS} if concept_words else set()
    for word in extra:
        if not _words(word):
            raise ValueError(f"--ban takes a word, got {word!r}")
        found.update(_words(word))
    return tuple(sorted(found))


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def ban_pattern(words: Sequence[str]) -> re.Pattern | None:
    """Matches a text holding a banned word as a whole word, or its plural ("nude": "nudes" too, not "nudity"
    or "denude"), in any case."""
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![^\W_])(?:{alternatives})(?:e?s)?(?![^\W_])", re.IGNORECASE)


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
        raise ValueError(f"no text searched for {source!r} has a finite distance to its target: each holds a banned "
                         "word (ban fewer words) or the target overflowed (a smaller --strength)")
    return decode(genomes[best:best + 1])[0], float(fitness[best])


def row_generator(row: PromptRow) -> torch.Generator:
    """The search's random numbers for ``row``: seeded by its case, text and seed, so that a resumed or
    reordered run finds what an unbroken one would."""
    return torch.Generator().manual_seed(zlib.crc32(f"{row.case}\0{row.prompt}\0{row.seed}".encode()))


# -- files ---------------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """``(with_concept, without_concept)`` pairs from a CSV file with those columns (``data.read_columns``)."""
    return [(row[PAIR_COLUMNS[0]], row[PAIR_COLUMNS[1]]) for row in read_columns(path, PAIR_COLUMNS, "pairs file")]


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


def toy_rows(concept: str, n: int, seed: int, guidance: float) -> list[PromptRow]:
    """The embedded world's prompts to attack: the benchmark's test captions naming ``concept`` by its
    name (``target-name``), with the benchmark's cases and seeds, so that their images compare one to one."""
    from trasce.benchmark import toy_prompt_sets, toy_target

    attribute, value = toy_target(concept)
    sets = toy_prompt_sets(concept, attribute, value, "test", seed, n_target=n, n_corner=1, n_other=1,
                           guidance=guidance)
    return [PromptRow(case=p.case, prompt=p.prompt, seed=p.seed, guidance_scale=p.guidance_scale, row=i + 1)
            for i, p in enumerate(sets["target-name"])]


def kept_columns(row: PromptRow) -> dict[str, str]:
    """The source row's other columns that the attack file keeps: all but those it writes itself and those
    trasce reads (a second prompt column would compete with the text found)."""
    return {key: value for key, value in row.extra.items() if key not in COLUMNS and key not in READ_COLUMNS}


def record(row: PromptRow, text: str, distance: float, source_distance: float) -> dict[str, str]:
    """One row of the attack file: ``text`` found for ``row``, at ``distance`` from its target (the source
    prompt lies ``source_distance`` from it)."""
    return {CASE_COLUMN: row.case, "prompt": text, "evaluation_seed": str(row.seed),
            "evaluation_guidance": repr(float(row.guidance_scale)), "source_prompt": row.prompt,
            "distance": f"{distance:.6g}", "source_distance": f"{source_distance:.6g}", **kept_columns(row)}


def render(records: Sequence[dict[str, str]]) -> bytes:
    """The attack file's CSV text: ``COLUMNS``, then the source file's columns it keeps, a line per record."""
    extra = list(dict.fromkeys(key for r in records for key in r if key not in COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue().encode("utf-8")


# -- the command ---------------------------------------------------------------------------------

#: The file ``run`` writes in its output folder (``run.json`` beside it holds the settings).
PROMPTS_FILE = "prompts.csv"
#: run.json settings that may change between sessions: where the files are, not what they hold (their
#: rows' checksums are settings), and the default seed, which the toy prompts' checksum covers.
# prompts_count and prompts_sha256: what folders made before the prompt file could grow recorded.
VOLATILE = ("prompts", "prompts_count", "prompts_sha256", "pairs", "seed", "device")


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


def _done(path: Path, rows: Sequence[PromptRow]) -> dict[str, dict[str, str]]:
    """The records ``path`` holds, by case, each checked against its source row (a file edited by hand)."""
    sources = {row.case: row for row in rows}
    done: dict[str, dict[str, str]] = {}
    for written in read_columns(path, COLUMNS, "trasce attack prompt file"):
        case = written[CASE_COLUMN]
        where = f"{path}, case {case!r}"
        if case in done:
            raise PromptFileError(f"{where}: appears twice; delete one of its rows")
        row = sources.get(case)
        if row is None:
            raise PromptFileError(f"{where}: no such case among the prompts attacked; delete its row")
        expected = record(row, "", 0.0, 0.0)  # the columns that come from the source row, as written
        for column in ("source_prompt", "evaluation_seed", "evaluation_guidance"):
            value = expected[column]
            if written[column] != value:
                raise PromptFileError(f"{where}, column {column!r}: {written[column]!r}, but the prompt attacked has "
                                      f"{value!r}; delete the row to search again")
        for column in ("distance", "source_distance"):
            try:
                float(written[column])
            except ValueError:
                raise PromptFileError(f"{where}, column {column!r}: {written[column]!r} is not a number; delete the "
                                      "row to search again") from None
        done[case] = written
    return done


def _checksum(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def run(options: AttackOptions) -> dict:
    """Write ``OUT/prompts.csv``: for each prompt, the text found; resumes a folder made with the same settings.

    Everything a user can get wrong is checked before the model loads. Returns ``folder``, ``file``,
    ``settings`` (as ``run.json`` holds them), ``rows`` (the records written) and ``nearer``: how many texts
    lie nearer their target than their source prompt does.
    """
    from tqdm.auto import tqdm

    from trasce import presets
    from trasce.eval.toy import toy_concept
    from trasce.generate import check_counts, hide_loading_bars, pick_device, pick_dtype, warn_of_other_prompt_columns
    from trasce.models import adapter_for
    from trasce.pipeline import DTYPES, is_toy_model, load_diffusers_pipeline, model_call_defaults, model_revision
    from trasce.runs import RunFolder, RunFolderError, atomic_write_bytes, check_run_place, refuse_several_processes

    refuse_several_processes("trasce attack", "and its processes would write one file over each other: start it "
                                              "without accelerate launch")
    check_counts({"--n-prompts": options.n_prompts, "--n-pairs": options.n_pairs, "--length": options.length})
    check_run_place(options.out, "trasce attack", holds_runs=False)
    AttackSettings(options.strength, options.length or 1, options.population, options.generations)
    concept = presets.resolve(options.preset, options.concept, None, None, None)[0]
    if options.prompt_column is not None and options.prompts is None:
        raise ValueError(f"--prompt-column {options.prompt_column!r} names a column of --prompts; give the file too")
    toy = is_toy_model(options.model)
    if not toy and (options.prompts is None or options.pairs is None):
        raise ValueError("on a model other than the embedded one, give --prompts (the prompts to rewrite, e.g. the "
                         "nudity rows of I2P) and --pairs (a CSV of prompts with and without the concept)")
    guidance = float(model_call_defaults(options.model)["guidance_scale"])
    if options.prompts is not None:
        rows = read_prompts(options.prompts, default_seed=options.seed, default_guidance=guidance,
                                 prompt_column=options.prompt_column)
        warn_of_other_prompt_columns(rows, options.prompts, options.prompt_column, show=True)
    else:
        rows = toy_rows(concept, options.n_prompts, options.seed, guidance)
    pairs = read_pairs(options.pairs) if options.pairs is not None else toy_pairs(concept, options.n_pairs,
                                                                                   options.seed)
    # On the embedded world a concept named by an alias ("a disc") bans its value's name too.
    toy_value = toy_concept(concept) if toy and not options.allow_concept_words else None
    also = [toy_value[1]] if toy_value is not None else []
    banned = banned_words(concept, [*options.ban, *also], concept_words=not options.allow_concept_words)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    settings = {
        "attack": "Ring-A-Bell (genetic search on the text encoder)", "model": str(options.model),
        "model_revision": model_revision(options.model),
        "concept": concept, "banned": list(banned), "strength": options.strength, "length": options.length,
        "population": options.population, "generations": options.generations,
        "dtype": next(name for name, value in DTYPES.items() if value == dtype), "device": str(device),
        # The prompts attacked are not pinned: the file may move or grow between sessions, as trasce generate's may;
        # each row already searched is held to its source row instead (_done).
        "prompts": None if options.prompts is None else str(options.prompts), "prompt_column": options.prompt_column,
        "pairs": None if options.pairs is None else str(options.pairs), "pairs_count": len(pairs),
        "pairs_sha256": _checksum(pairs), "seed": options.seed,
    }
    folder = RunFolder(options.out)
    path = folder.path / PROMPTS_FILE
    try:
        before = folder.read_run_json()
    except RunFolderError:
        if not options.overwrite:
            raise
        before = None  # damaged: --overwrite replaces it
    if folder.manifest_path.exists() or folder.images_dir.exists() or (before and "attack" not in before["settings"]):
        raise RunFolderError(f"{folder.path} holds a trasce generate run, not an attack's prompts; give trasce attack "
                             "a folder of its own")
    if options.overwrite:
        done = {}
    elif before is not None:
        # The same settings, or a RunFolderError naming one; the length is known once the tokenizer is.
        folder.write_run_json(settings, volatile=(*VOLATILE, "length"))
        done = _done(path, rows) if path.exists() else {}
    elif path.exists():
        raise RunFolderError(f"{folder.path} holds {PROMPTS_FILE} but no run.json, so the settings it was made with "
                             "cannot be checked; give another --out, or --overwrite to replace it")
    else:
        done = {}

    hide_loading_bars()
    pipe = load_diffusers_pipeline(options.model, torch_dtype=dtype).to(device)
    tokenizer = pipe.tokenizer
    most = tokenizer.model_max_length - 2  # the start and end tokens
    length = options.length if options.length is not None else min(16, most)
    if length > most:
        raise ValueError(f"--length {length}: this model's tokenizer takes 1 to {most} tokens besides its start and "
                         "end tokens")
    search_settings = AttackSettings(options.strength, length, options.population, options.generations)
    settings["length"] = length
    encode = encoder(adapter_for(pipe))
    shift = search_settings.strength * concept_vector(encode, pairs)
    source_distance = float(shift.pow(2).mean())  # every source prompt lies this far from its target
    if not math.isfinite(source_distance):
        raise ValueError(f"--strength {options.strength}: the distances to the target overflow; give a smaller "
                         "strength")
    if options.overwrite:  # only now that nothing is left to refuse
        for stale in (path, folder.run_json_path):
            stale.unlink(missing_ok=True)
    folder.write_run_json(settings, volatile=VOLATILE)
    pattern = ban_pattern(banned)
    tokens = vocabulary(tokenizer, pattern)
    records = {row.case: {**done[row.case], **kept_columns(row)} for row in rows if row.case in done}

    def decode(genomes: torch.Tensor) -> list[str]:
        return [text.strip() for text in tokenizer.batch_decode(genomes.tolist(), skip_special_tokens=True)]

    todo = [row for row in rows if row.case not in records]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="attack", unit="prompt", disable=options.quiet)
    for row in todo:
        target = encode([row.prompt])[0] + shift
        text, distance = search(encode, decode, tokens, row.prompt, target, search_settings, row_generator(row),
                                pattern)
        records[row.case] = record(row, text, distance, source_distance)
        atomic_write_bytes(path, render([records[r.case] for r in rows if r.case in records]))
        bar.update()
    bar.close()
    written = [records[r.case] for r in rows]
    return {"folder": str(folder.path), "file": str(path), "settings": settings, "rows": written,
            "nearer": sum(float(r["distance"]) < float(r["source_distance"]) for r in written)}
