"""``trasce benchmark``: one erasure suite end to end, generate -> evaluate -> report.

Every method runs on the same pipeline components, the same prompts and the same initial noise per
prompt (:func:`trasce.generate.initial_noise` from the prompt's own seed), so the rows of the table
differ by the method alone:

    none               plain CFG, nothing erased
    negative_prompt    conventional negative prompting: eps_c + s (eps_p - eps_c)
    sld-weak ... -max  Safe Latent Diffusion, diffusers' StableDiffusionPipelineSafe with its SafetyConfig
    negation           TraSCE part 1 alone: eps_0 + s (eps_p - eps_c)
    steering           TraSCE part 2 alone (plain CFG, localized steering)
    trasce             both parts

On the embedded world (``--model toy``) the prompts are toy captions of one caption split (``test``;
settings are chosen on ``val``) in four prompt sets: ``target-name`` (the concept named by its name),
``target-alias`` (only by an alias), ``corner`` (the prompt *is* the concept text, several seeds) and
``other`` (another value of the concept's attribute, for fidelity). The embedded judge scores them.
A real model takes ``--target-prompts``/``--other-prompts`` files and a ``--judge`` from
:data:`trasce.eval.evaluate.JUDGES`.

Layout of ``--out DIR``::

    DIR/<method>/<prompt set>/    a trasce generate run folder (images/, manifest.jsonl, run.json): resumable
    DIR/results.json              every number, the settings, protocol lines, machine and versions
    DIR/results.md                the table, rows = methods
    DIR/report.html, DIR/grid.png the table and a grid of a few prompts of each set, columns = methods
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from trasce.bench import json_ready, synchronize
from trasce.data import MAX_SEED
from trasce.eval.base import rate_entry
from trasce.generate import (
    GUIDANCE_OFF,
    GUIDANCE_OFF_MODES,
    batches,
    check_counts,
    check_guidance_off,
    check_lazy_tolerance,
    check_runnable,
    check_size_flags,
    hide_loading_bars,
    initial_noise,
    pick_device,
    pick_dtype,
    warn_of_an_unscaled_sigma,
    warn_of_other_prompt_columns,
)
from trasce.pipeline import NonFiniteImageWarning, TraSCEPipeline, is_toy_model, model_call_defaults, model_revision
from trasce.runs import (
    RunFolder,
    atomic_save_image,
    atomic_write_bytes,
    check_run_place,
    package_versions,
    refuse_several_processes,
    source_commit,
)
from trasce.sampler import DEFAULT_LAZY_TOLERANCE, STEERING_MODES

METHODS: dict[str, str] = {
    "none": "unprotected: plain classifier-free guidance",
    "negative_prompt": "conventional negative prompt: eps_c + s (eps_p - eps_c)",
    "sld-weak": "Safe Latent Diffusion, SafetyConfig.WEAK (diffusers StableDiffusionPipelineSafe)",
    "sld-medium": "Safe Latent Diffusion, SafetyConfig.MEDIUM (diffusers StableDiffusionPipelineSafe)",
    "sld-strong": "Safe Latent Diffusion, SafetyConfig.STRONG (diffusers StableDiffusionPipelineSafe)",
    "sld-max": "Safe Latent Diffusion, SafetyConfig.MAX (diffusers StableDiffusionPipelineSafe)",
    "negation": "TraSCE part 1 alone: eps_0 + s (eps_p - eps_c)",
    "steering": "TraSCE part 2 alone: plain CFG with localized steering",
    "trasce": "TraSCE: modified negative prompting and localized steering",
}
SLD_LEVELS = {"sld-weak": "WEAK", "sld-medium": "MEDIUM", "sld-strong": "STRONG", "sld-max": "MAX"}

TOY_SPLITS: dict[str, str] = {
    "target-name": "toy captions that ask for the concept by its name",
    "target-alias": "toy captions that ask for the concept only by an alias or description",
    "corner": "the prompt is exactly the concept text, one image per seed (the corner case of negative prompting)",
    "other": "toy captions that ask for another value of the concept's attribute (for fidelity)",
}
REAL_SPLITS: dict[str, str] = {
    "target": "the rows of --target-prompts",
    "corner": "the prompt is exactly the concept text, one image per seed (the corner case of negative prompting)",
    "other": "the rows of --other-prompts (for fidelity)",
}
TARGET_SPLITS = ("target-name", "target-alias", "target", "corner")
PRESET_FOR_ATTRIBUTE = {"shape": "toy-shape", "fill": "toy-fill"}
# Judges of a real model whose verdicts the benchmark summarises: a rate of the concept shown, or FID.
BENCHMARK_JUDGES = ("nudenet", "q16", "imagenet", "fid")
# Prompt i of prompt set j gets seed --seed + j * SEED_STRIDE + i: every image has its own noise,
# and growing a set (--n-target 40 after 2) keeps the seeds of the prompts already made.
SEED_STRIDE = 100_000
# The largest --seed: every prompt's seed, --seed + j * SEED_STRIDE + i, must stay within data.MAX_SEED
# (torch's CPU generator keeps 32 bits). Ten strides cover the four prompt sets' offsets with room to spare.
MAX_BASE_SEED = MAX_SEED - 10 * SEED_STRIDE
# Settings that change no image; the prompt source is held image by image instead (RunFolder.done_for).
VOLATILE = ("batch_size", "device", "quiet", "grid_rows", "prompt_source")


@dataclass
class BenchmarkOptions:
    """Everything ``trasce benchmark`` takes; field names are the CLI's options."""

    out: Path
    concept: str | None = None
    model: str = "toy"
    methods: str | Sequence[str] = tuple(METHODS)
    split: str = "test"
    n_target: int = 40
    n_corner: int = 16
    n_other: int = 80
    target_prompts: Path | None = None
    other_prompts: Path | None = None
    prompt_column: str | None = None  # of --target-prompts; None: the first of data.PROMPT_COLUMNS a row has
    judge: str | None = None
    judge_options: dict[str, str] = field(default_factory=dict)
    preset: str | None = None
    loss_scale: float | None = None
    step_size: float | None = None
    sigma: float | None = None
    lazy_tolerance: float | None = DEFAULT_LAZY_TOLERANCE
    exact: bool = False
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int = 42
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    height: int | None = None  # None: the model's default size
    width: int | None = None
    grid_rows: int = 3
    quiet: bool = False
    overwrite: bool = False


@dataclass
class Prompt:
    """One image to make: its name in the run folder, its text, seed and CFG scale, and the prompt file's
    other columns (``extra``: I2P's ``categories`` give per-category rates, imagenet's ``class`` the label)."""

    case: str
    prompt: str
    seed: int
    guidance_scale: float
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Inputs


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """A comma list (or sequence) of method names, checked and de-duplicated, in the order given."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    chosen: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in METHODS:
            raise ValueError(f"unknown method {raw.strip()!r}; valid methods: {', '.join(METHODS)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"no method given; valid methods: {', '.join(METHODS)}")
    return chosen


def toy_target(concept: str | None) -> tuple[str, str]:
    """``(attribute, value)`` of a toy concept; ``ValueError`` listing the valid values otherwise."""
    from trasce.eval.toy import toy_concept
    from trasce.toy.captions import VOCABULARY

    found = toy_concept(concept)
    if found is None:
        valid = "; ".join(f"{attribute} {', '.join(values)}" for attribute, values in VOCABULARY.items())
        shown = "no concept" if not concept or not concept.strip() else f"concept {concept!r}"
        raise ValueError(f"{shown} is not one value of the toy world; valid: {valid} (or an alias, e.g. 'a disc')")
    return found


def concept_captions(n_name: int, n_alias: int, split: str, seed: int, attribute: str,
                     value: str) -> tuple[list[str], list[str]]:
    """``n_name`` captions naming ``value`` by its name and ``n_alias`` naming it only by an alias.

    Both come from one pool of captions of ``split`` that ask for the value; the pool is grown until
    both are full. ``caption_set`` draws the same sequence whatever its size, so a larger request
    starts with the captions of a smaller one.
    """
    from trasce.eval.toy import mention_kind
    from trasce.toy.captions import VOCABULARY, caption_set

    index = list(VOCABULARY[attribute]).index(value)
    size = max(8, 4 * (n_name + n_alias))
    while True:
        try:
            pool = caption_set(size, split, seed, require=(attribute,), fixed={attribute: index})
        except ValueError as error:
            raise ValueError(f"not enough {split} captions ask for {attribute} {value!r}: {error}") from error
        name = [c for c in pool if mention_kind(c, attribute, value) == "name"][:n_name]
        alias = [c for c in pool if mention_kind(c, attribute, value) == "alias"][:n_alias]
        if len(name) == n_name and len(alias) == n_alias:
            return name, alias
        size *= 2


def _other_captions(n: int, split: str, seed: int, attribute: str, value: str) -> list[str]:
    """``n`` captions of ``split`` that ask for a value of ``attribute`` other than ``value``."""
    from trasce.toy.captions import caption_set, mentioned

    size = max(8, 2 * n)
    while True:
        pool = caption_set(size, split, seed, require=(attribute,))
        found = [c for c in pool if mentioned(c).get(attribute) != value][:n]
        if len(found) == n:
            return found
        size *= 2


def _rows(split_index: int, texts: Sequence[str], seed: int, guidance: float) -> list[Prompt]:
    return [Prompt(f"{i:05d}", text, seed + split_index * SEED_STRIDE + i, guidance) for i, text in enumerate(texts)]


def toy_prompt_sets(concept: str, attribute: str, value: str, split: str, seed: int, n_target: int, n_corner: int,
                    n_other: int, guidance: float) -> dict[str, list[Prompt]]:
    """The four prompt sets of the embedded world (see :data:`TOY_SPLITS`), seeds included."""
    name, alias = concept_captions(n_target, n_target, split, seed, attribute, value)
    texts = {
        "target-name": name,
        "target-alias": alias,
        "corner": [concept.strip()] * n_corner,
        "other": _other_captions(n_other, split, seed + 1, attribute, value),
    }
    return {key: _rows(j, texts[key], seed, guidance) for j, key in enumerate(TOY_SPLITS)}


def real_prompt_sets(options: BenchmarkOptions, concept: str, guidance: float) -> dict[str, list[Prompt]]:
    """``target`` and ``other`` from the prompt files (their own seeds and scales), ``corner`` made here."""
    from trasce import data

    sets: dict[str, list[Prompt]] = {}
    files = {"target": options.target_prompts, "other": options.other_prompts}
    for j, key in enumerate(REAL_SPLITS):
        if key == "corner":
            sets[key] = _rows(j, [concept.strip()] * options.n_corner, options.seed, guidance)
        elif files[key] is not None:
            column = options.prompt_column if key == "target" else None  # (an attack file beside COCO captions)
            rows = data.read_prompts(files[key], options.seed, guidance, column)
            warn_of_other_prompt_columns(rows, files[key], column, show=True)
            sets[key] = [Prompt(r.case, r.prompt, r.seed, r.guidance_scale, r.extra) for r in rows]
    return sets


def _check_sizes(options: BenchmarkOptions, toy: bool) -> None:
    counts = {"--n-corner": options.n_corner, "--batch-size": options.batch_size}
    if toy:
        counts.update({"--n-target": options.n_target, "--n-other": options.n_other})
    check_counts(counts)
    if options.grid_rows < 0:
        raise ValueError(f"--grid-rows must be 0 or more, got {options.grid_rows}")
    check_size_flags(options.height, options.width)
    if not 0 <= options.seed <= MAX_BASE_SEED:
        raise ValueError(f"--seed must be between 0 and {MAX_BASE_SEED}, got {options.seed}: prompt i of prompt set "
                         f"j gets seed --seed + {SEED_STRIDE} j + i, and seeds stop at {MAX_SEED} (2**32 - 1)")


# --------------------------------------------------------------------------------------------------
# Methods: one callable per method, all on the same components


def sld_config(level: str) -> dict[str, float]:
    """diffusers' ``SafetyConfig.<level>`` (``WEAK``, ``MEDIUM``, ``STRONG``, ``MAX``): the ``sld_*`` arguments."""
    try:
        from diffusers.pipelines.stable_diffusion_safe import SafetyConfig
    except ImportError:  # diffusers >= 0.34 moved it among the deprecated pipelines
        try:
            from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
        except ImportError as error:
            raise ValueError(f"the sld-* methods need diffusers' StableDiffusionPipelineSafe ({error})") from error
    return dict(getattr(SafetyConfig, level))


@functools.cache
def _latent_output_safe_pipeline() -> type:
    from diffusers import StableDiffusionPipelineSafe

    class LatentOutputSafePipeline(StableDiffusionPipelineSafe):
        """SLD exactly as diffusers samples it, but ``decode_latents`` hands back the final latents.

        The images are then decoded by the same adapter as every other method's (and a pixel-space
        model, which has no VAE to decode with, works too).
        """

        def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
            return latents

    return LatentOutputSafePipeline


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' logger (SLD's deprecation notice) and warnings for the block."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def check_sld(pipe: TraSCEPipeline) -> None:
    """``ValueError`` unless ``pipe`` is Stable Diffusion 1.x/2.x or the embedded model: SLD takes their components."""
    from trasce.models.sd import StableDiffusionAdapter

    if not isinstance(pipe.adapter, StableDiffusionAdapter):
        raise ValueError(f"the sld-* methods run diffusers' StableDiffusionPipelineSafe, which takes Stable "
                         f"Diffusion 1.x/2.x components; this model is {pipe.adapter.family}: give --methods "
                         "without them (e.g. none,negative_prompt,negation,steering,trasce)")


def sld_pipeline(pipe: TraSCEPipeline, concept: str):
    """diffusers' ``StableDiffusionPipelineSafe`` on ``pipe``'s own components, erasing ``concept``.

    Raises ``ValueError`` for a model that is not Stable Diffusion 1.x/2.x (SLD takes those components).
    """
    check_sld(pipe)
    base = pipe.pipe
    with _quiet_diffusers():
        safe = _latent_output_safe_pipeline()(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            scheduler=type(base.scheduler).from_config(base.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    # SLD's constructor turns clip_sample off on the scheduler it is given (right for latent models,
    # wrong for the pixel one) and assumes a VAE factor of 8: give it the model's own of both.
    safe.scheduler = type(base.scheduler).from_config(base.scheduler.config)
    safe.vae_scale_factor = pipe.adapter.vae_scale_factor
    safe.safety_concept = concept
    safe.set_progress_bar_config(disable=True)
    return safe


# (prompts, initial noise (B, ...), a generator per image for the scheduler's noise, CFG scale per image,
# steps) -> PIL images and per-image statistics
Runner = Callable[[list[str], torch.Tensor, list[torch.Generator], list[float], int],
                  tuple[list, list[dict[str, Any]]]]


def method_runner(method: str, pipe: TraSCEPipeline, concept: str, height: int, width: int) -> Runner:
    """A callable that generates with ``method`` on ``pipe``'s components."""
    if method in SLD_LEVELS:
        safe = sld_pipeline(pipe, concept)
        config = sld_config(SLD_LEVELS[method])

        @torch.no_grad()
        def run_sld(prompts: list[str], latents: torch.Tensor, generators: list[torch.Generator], scales: list[float],
                    steps: int):
            images: list = [None] * len(prompts)
            stats: list[dict] = [{} for _ in prompts]
            # SLD takes one CFG scale per call: one call per distinct scale, each image back in its place.
            # A prompt longer than the tokenizer takes goes alone: diffusers' safe pipeline pads the
            # untruncated ids it checks for its warning to the longest prompt only, and a batch of
            # unequal lengths fails to become a tensor (the images do not depend on the batch).
            limit = safe.tokenizer.model_max_length
            long = {i for i, prompt in enumerate(prompts) if len(safe.tokenizer(prompt).input_ids) > limit}
            calls = [(scale, index) for scale in dict.fromkeys(scales)
                     for index in ([[i] for i, s in enumerate(scales) if s == scale and i in long]
                                   + [[i for i, s in enumerate(scales) if s == scale and i not in long]]) if index]
            for scale, index in calls:
                final = safe([prompts[i] for i in index], height=height, width=width, num_inference_steps=steps,
                             guidance_scale=scale, latents=latents[index].to(pipe.adapter.device, pipe.adapter.dtype),
                             generator=[generators[i] for i in index], output_type="latent", **config).images
                decoded, flagged = pipe.adapter.decode(final, "pil")
                for i, image, flag in zip(index, decoded, flagged or [None] * len(index), strict=True):
                    images[i] = image
                    if flag is not None:
                        stats[i]["nsfw_content_detected"] = flag
            return images, stats

        return run_sld

    variant = pipe.with_settings(mode=method, concept=concept)

    def run_trasce(prompts: list[str], latents: torch.Tensor, generators: list[torch.Generator], scales: list[float],
                   steps: int):
        with warnings.catch_warnings():  # an image that overflowed is refused below
            warnings.simplefilter("ignore", NonFiniteImageWarning)
            out = variant(prompts, num_inference_steps=steps, guidance_scale=scales, latents=latents,
                          generator=generators, height=height, width=width, output_type="pil")
        overflowed = [i for i, finite in enumerate(out.finite.tolist()) if not finite]
        if overflowed:  # a black image would count as erased
            i = overflowed[0]
            half = " (or --dtype fp32 or bf16 in place of fp16)" if variant.adapter.dtype == torch.float16 else ""
            raise ValueError(f"{method}: the image of {prompts[i]!r} (CFG {scales[i]:g}) came out with NaN or inf in "
                             "its final latent, so it would be black; nothing of its batch was saved (the images "
                             f"made before it are kept). An overflow: give a usual --guidance-scale{half}")
        return out.images, [out.stats(i) for i in range(len(prompts))]

    return run_trasce


def method_settings(method: str, pipe: TraSCEPipeline, concept: str, preset: str | None) -> dict[str, Any]:
    """What defines a method's images besides the shared settings (recorded, and checked on resume)."""
    if method in SLD_LEVELS:
        return {"pipeline": "diffusers StableDiffusionPipelineSafe", "safety_config": SLD_LEVELS[method],
                "safety_concept": concept, **sld_config(SLD_LEVELS[method])}
    if method == "none":
        return {"mode": "none"}
    if method == "negative_prompt":
        return {"mode": method, "negative_prompt": concept}
    s = pipe.settings
    entry: dict[str, Any] = {"mode": method, "concept": concept, "kernel": s.kernel, "preset": preset}
    if method != "negation":
        entry.update(loss_scale=s.loss_scale, step_size=s.step_size, sigma=s.sigma)
    return entry


# --------------------------------------------------------------------------------------------------
# Generation


def _generate(folder: RunFolder, todo: list[Prompt], runner: Runner, pipe: TraSCEPipeline, method: str,
              split: str, concept: str, steps: int, size: tuple[int, int], batch_size: int, bar) -> None:
    """Make ``todo``'s images into ``folder``, timing each batch; every image is recorded as it is saved."""
    device = pipe.adapter.device
    for batch in batches(todo, batch_size):
        noises = [initial_noise(pipe, p.seed, 1, *size) for p in batch]
        latents = torch.cat([noise for noise, _ in noises])
        generators = [generator for _, (generator,) in noises]
        synchronize(device)
        start = time.perf_counter()
        images, stats = runner([p.prompt for p in batch], latents, generators, [p.guidance_scale for p in batch], steps)
        synchronize(device)
        seconds = (time.perf_counter() - start) / len(batch)
        for p, image, image_stats in zip(batch, images, stats, strict=True):
            atomic_save_image(folder.image_path(p.case), image)
            folder.append_manifest({
                "file": folder.image_file(p.case), "case": p.case, "k": 0, "prompt": p.prompt, "seed": p.seed,
                "guidance_scale": p.guidance_scale, "method": method, "split": split, "concept": concept,
                "seconds": round(seconds, 6), "batch": len(batch), "extra": p.extra, **image_stats,
                **({GUIDANCE_OFF: True} if method in GUIDANCE_OFF_MODES and p.guidance_scale <= 1 else {}),
            })
        bar.update(len(batch))


# --------------------------------------------------------------------------------------------------
# Evaluation


def fid_or_none(a, b) -> tuple[float | None, str | None]:
    """Fréchet distance of two feature sets, clipped at 0 (negative values are rounding), or why there is none."""
    from trasce.eval.fid import fid_from_features

    if a is None or b is None:
        return None, "no features"
    if len(a) < 2 or len(b) < 2:
        return None, f"needs 2 or more images per set, got {len(a)} and {len(b)}"
    try:
        return max(0.0, fid_from_features(a, b)), None
    except ValueError as error:
        return None, str(error)


def _toy_evaluate(folders: dict[str, dict[str, RunFolder]], sets: dict[str, list[Prompt]], attribute: str,
                  value: str) -> tuple[dict, dict, dict]:
    """Judge every image with the embedded judge: per method and set, rates and per-image verdicts."""
    from trasce.eval.evaluate import load_image
    from trasce.toy.captions import agreement
    from trasce.toy.judge import Judge, from_pil

    judge = Judge.load()
    results: dict[str, dict[str, Any]] = {}
    features: dict[str, Any] = {}
    for method, by_split in folders.items():
        results[method] = {}
        for split, folder in by_split.items():
            rows = sets[split]
            images = from_pil([load_image(folder.image_path(p.case))[0] for p in rows])
            seen = judge.classify(images)
            verdicts = []
            for p, verdict in zip(rows, seen, strict=True):
                verdicts.append({"case": p.case, "file": folder.image_file(p.case), "prompt": p.prompt, "seed": p.seed,
                                 "seen": verdict, "target_seen": verdict[attribute] == value,
                                 "agreement": agreement(p.prompt, verdict)})
            entry: dict[str, Any] = {
                "images": len(rows),
                "target_rate": rate_entry(sum(v["target_seen"] for v in verdicts), len(verdicts)),
            }
            if split == "other":
                features[method] = judge.features(images).double().cpu().numpy()
                per_attribute = {}
                for name in judge.attributes:
                    judged = [v["agreement"][name] for v in verdicts if name in v["agreement"]]
                    per_attribute[name] = rate_entry(sum(judged), len(judged))
                named = [all(v["agreement"].values()) for v in verdicts if v["agreement"]]
                entry["fidelity"] = {"attribute": attribute, "concept_attribute": per_attribute[attribute],
                                     "all_attributes": rate_entry(sum(named), len(named)),
                                     "per_attribute": per_attribute}
            entry["verdicts"] = verdicts
            results[method][split] = entry
    judge_settings = {"judge": "toy", "weights": "shipped", "config": judge.config.get("accuracy")}
    return results, features, judge_settings


def _real_evaluate(folders: dict[str, dict[str, RunFolder]], sets: dict[str, list[Prompt]], judge_name: str,
                   judge_options: dict[str, str], quiet: bool) -> tuple[dict, dict, dict]:
    """Judge every folder with ``judge_name`` (``trasce evaluate``'s resumable verdict files)."""
    from trasce.eval.evaluate import evaluate_folder, read_verdicts, verdicts_path
    from trasce.eval.fid import decode_features

    results: dict[str, dict[str, Any]] = {}
    features: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for method, by_split in folders.items():
        results[method] = {}
        for split, folder in by_split.items():
            # (--overwrite here would discard the images too)
            summary = evaluate_folder(folder.path, judge_name, judge_options, quiet=quiet,
                                      rejudge_hint="delete that file (the images stay) to judge every image again")
            settings = {"judge": summary["judge"], "settings": summary["settings"], "protocol": summary.get("protocol")}
            _, verdicts_by_file = read_verdicts(verdicts_path(folder.path, summary["judge"]))
            verdicts = [verdicts_by_file[folder.image_file(p.case)] for p in sets[split]]
            # The concept shown: flagged (nudenet, q16), or recognised as the class the prompt names (imagenet).
            flagged = [bool(v["flagged"] if "flagged" in v else v["correct"]) for v in verdicts
                       if "flagged" in v or v.get("correct") is not None]
            entry: dict[str, Any] = {
                "images": len(verdicts),
                "target_rate": rate_entry(sum(flagged), len(flagged)) if flagged else None,
                "verdicts_file": str(verdicts_path(folder.path, summary["judge"])),
            }
            if split == "other":
                if summary.get("all_prompted_values_present"):  # a judge that reads what a prompt asks for
                    entry["fidelity"] = {"attribute": None, "concept_attribute": None,
                                         "all_attributes": summary["all_prompted_values_present"]}
                if verdicts and all("features" in v for v in verdicts):  # a judge that embeds images
                    import numpy as np

                    features[method] = np.stack([decode_features(v["features"]) for v in verdicts])
            results[method][split] = entry
    return results, features, settings


# --------------------------------------------------------------------------------------------------
# Tables and the report


def _pct(entry: dict | None) -> str:
    if not entry or entry.get("rate") is None:
        return "-"
    low, high = entry["ci95"]
    return f"{100 * entry['rate']:.1f} % ({100 * low:.0f}-{100 * high:.0f})"


def _number(value: float | str | None, digits: int = 3) -> str:
    if value is None or isinstance(value, str):  # not measured, or a non-finite number as json_ready writes it
        return "-" if value is None else value
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: one row per method."""
    splits = [s for s in results["prompt_sets"] if s in TARGET_SPLITS]
    target = results.get("target") or {}
    attribute = target.get("attribute")
    header = ["method", *[f"target rate, {s}" for s in splits]]
    if attribute:
        header += [f"{attribute} agreement, other", "all-attribute agreement, other"]
    else:
        header += ["fidelity, other"]
    header += ["FID vs none, other", "s/image"]
    rows = []
    for method, entry in results["methods"].items():
        row = [method, *[_pct((entry["prompt_sets"].get(s) or {}).get("target_rate")) for s in splits]]
        fidelity = (entry["prompt_sets"].get("other") or {}).get("fidelity") or {}
        if attribute:
            row += [_pct(fidelity.get("concept_attribute")), _pct(fidelity.get("all_attributes"))]
        else:
            row += [_pct(fidelity.get("all_attributes"))]
        row += [_number(entry.get("fid_vs_none")), _number(entry.get("seconds_per_image"))]
        rows.append(row)
    return header, rows


def _grid(out: Path, results: dict, folders: dict[str, dict[str, RunFolder]], sets: dict[str, list[Prompt]],
          rows_per_set: int) -> tuple[Path | None, str]:
    """``grid.png`` (a few prompts of each set by the methods) and an HTML table of the same cells with verdicts."""
    from PIL import Image

    from trasce.report import Html, grid, image_tag, save_png, table

    if rows_per_set == 0:
        return None, ""
    methods = list(folders)
    cells, labels, html_rows = [], [], []
    target = results.get("target") or {}
    for split, prompts in sets.items():
        for index, p in enumerate(prompts[:rows_per_set]):
            images, html_row = [], [f"{split}: {p.prompt} (seed {p.seed})"]
            for method in methods:
                path = folders[method][split].image_path(p.case)
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
                verdicts = results["methods"][method]["prompt_sets"][split].get("verdicts")
                note = ""
                if verdicts:
                    v = verdicts[index]
                    seen = v["seen"]
                    words = f"{seen['color']} {seen['fill']} {seen['shape']} on {seen['background']}"
                    mark = (f'<span class="bad">{html.escape(target["value"])}</span>' if v["target_seen"]
                            else '<span class="good">no</span>')
                    asked = html.escape(f"{target['attribute']}={target['value']}?")
                    note = f"<br>{html.escape(words)}<br>{asked} {mark}"
                html_row.append(Html(f"{image_tag(path, out, 64)}{note}"))
            cells.append(images)
            labels.append(f"{split}: {p.prompt}")
            html_rows.append(html_row)
    picture = save_png(grid(cells, row_labels=labels, column_labels=methods, cell=112), out / "grid.png")
    return picture, table(["prompt (seed)", *methods], html_rows)


def _steering_words(settings: dict) -> str:
    tolerance = settings.get("lazy_tolerance", DEFAULT_LAZY_TOLERANCE)  # (results written before it was recorded)
    return ("exact steering (every backward pass)" if tolerance is None else
            f"lazy steering (backward passes skipped below {tolerance:g} RMS per latent element)")


def caption(results: dict, sets: dict[str, list[Prompt]]) -> str:
    """What the table's images were made with, in one paragraph (the report's and results.md's)."""
    s = results["settings"]
    target = results.get("target")
    scales = sorted({prompt.guidance_scale for prompts in sets.values() for prompt in prompts})
    cfg = (f"CFG {scales[0]:g}" if len(scales) == 1 else
           f"CFG from the prompt files' rows ({', '.join(f'{scale:g}' for scale in scales)})")
    return (f"Model {s['model']}, concept {results['concept']!r}"
            + (f" ({target['attribute']} = {target['value']})" if target else "")
            + f"; {s['steps']} steps, {cfg}, {s['scheduler']}, {s['height']}x{s['width']}, {s['dtype']} on "
            f"{s['device']}; prompts: {s['prompt_source']}"
            + (f" (column {s['prompt_column']!r})" if s.get("prompt_column") else "")
            + f"; TraSCE lambda {s['loss_scale']}, eta {s['step_size']}, sigma {s['sigma']} (preset {s['preset']}), "
            f"{_steering_words(s)}. Same components, prompts and initial noise in every row.")


def write_report(out: Path, results: dict, folders: dict[str, dict[str, RunFolder]],
                 sets: dict[str, list[Prompt]], rows_per_set: int) -> Path:
    """``report.html``: the settings, the table, the protocol lines and the grid."""
    from trasce.report import image_tag, table, write_page

    header, rows = results_table(results)
    picture, cells = _grid(out, results, folders, sets, rows_per_set)
    about = html.escape(caption(results, sets))
    sets_list = "".join(f"<li><b>{html.escape(k)}</b> ({v['n']}): {html.escape(v['description'])}</li>"
                        for k, v in results["prompt_sets"].items())
    protocol = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
                       for k, v in results["protocol"].items())
    body = (f"<p>{about}</p>{table(header, rows)}<h2>Prompt sets</h2><ul>{sets_list}</ul>"
            f"<h2>Protocol</h2><ul>{protocol}</ul>")
    if picture is not None:
        body += f"<h2>Images</h2><p>{image_tag(picture, out)}</p>{cells}"
    return write_page(out / "report.html", f"trasce benchmark: erasing '{results['concept']}'", body)


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------
# The run


def run_benchmark(options: BenchmarkOptions, pipe: TraSCEPipeline | None = None) -> dict[str, Any]:
    """Generate what is missing, judge everything, write ``results.json``, ``results.md`` and ``report.html``.

    ``pipe`` reuses an already loaded pipeline (its settings are replaced per method). Every input is
    checked before the model is loaded; user errors are one-line ``ValueError``s. Returns the results.
    """
    from trasce import presets

    commit = source_commit()  # of the code imported now, whatever the checkout holds when the run ends
    refuse_several_processes("trasce benchmark", "each of which would make every image. Run it alone; to spread "
                             "many prompts over GPUs, run trasce generate and trasce evaluate under accelerate")
    methods = parse_methods(options.methods)
    out = Path(options.out)
    check_run_place(out, "trasce benchmark", holds_runs=True)
    toy = is_toy_model(options.model)
    _check_sizes(options, toy)
    if options.split not in ("test", "val"):
        raise ValueError(f"--split must be test or val, got {options.split!r}")
    check_lazy_tolerance(options.lazy_tolerance)
    lazy_tolerance = None if options.exact else options.lazy_tolerance

    defaults = pipe.call_defaults if pipe is not None else model_call_defaults(options.model)
    guidance = options.guidance_scale if options.guidance_scale is not None else defaults["guidance_scale"]
    steps = options.steps if options.steps is not None else defaults["steps"]
    check_counts({"--steps": steps})

    target: dict[str, str] | None = None
    preset = options.preset
    if toy:
        if options.target_prompts is not None or options.other_prompts is not None:
            raise ValueError("--target-prompts and --other-prompts are for real models; the embedded world draws "
                             "its prompts from the toy captions (--split, --n-target, --n-corner, --n-other)")
        if options.judge not in (None, "toy"):
            raise ValueError(f"the embedded world is scored by the embedded toy judge; --judge {options.judge} "
                             "is for real models")
        if options.prompt_column is not None:
            raise ValueError("--prompt-column names a column of --target-prompts and --other-prompts, which are for "
                             "real models; the embedded world draws its prompts from the toy captions")
        attribute, value = toy_target(options.concept)
        target = {"attribute": attribute, "value": value}
        preset = preset or PRESET_FOR_ATTRIBUTE.get(attribute, "toy-shape")
        concept = presets.resolve(preset, options.concept, options.loss_scale, options.step_size, options.sigma)[0]
        sets = toy_prompt_sets(concept, attribute, value, options.split, options.seed, options.n_target,
                               options.n_corner, options.n_other, guidance)
        split_descriptions = TOY_SPLITS
        prompt_source = f"toy captions, {options.split} split, caption seed {options.seed}"
        judge_name = "toy"
    else:
        from trasce.eval.evaluate import JUDGES, check_judge

        concept = presets.resolve(preset, options.concept, options.loss_scale, options.step_size, options.sigma)[0]
        if options.target_prompts is None:
            raise ValueError("a real model needs --target-prompts FILE (prompts that ask for the concept)")
        if not options.judge:
            raise ValueError(f"a real model needs --judge NAME to score its images; one of {', '.join(JUDGES)}")
        judge_name = options.judge.strip().lower()
        if judge_name not in JUDGES:
            raise ValueError(f"unknown judge {options.judge!r}; valid judges: {', '.join(JUDGES)}")
        if judge_name not in BENCHMARK_JUDGES:
            raise ValueError(f"--judge {judge_name} gives a score per image, which trasce benchmark does not "
                             f"summarise; use {', '.join(BENCHMARK_JUDGES)} (a rate per prompt set, or fid: FID "
                             "against the unprotected images), or trasce evaluate on the method's folders")
        sets = real_prompt_sets(options, concept, guidance)
        check_judge(judge_name, options.judge_options, concept)  # before any image is made
        split_descriptions = REAL_SPLITS
        prompt_source = ", ".join(f"{k} {v}" for k, v in
                                  (("--target-prompts", options.target_prompts),
                                   ("--other-prompts", options.other_prompts)) if v is not None)

    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    if options.quiet:
        hide_loading_bars()
    loaded = pipe is None  # (a pipeline passed in need not be options.model's)
    if pipe is None:
        pipe = TraSCEPipeline.from_pretrained(options.model, torch_dtype=dtype, scheduler=options.scheduler,
                                              safety_checker=False, concept=concept, preset=preset,
                                              loss_scale=options.loss_scale, step_size=options.step_size,
                                              sigma=options.sigma, lazy_tolerance=lazy_tolerance).to(device)
    else:
        resolved = presets.resolve(preset, concept, options.loss_scale, options.step_size, options.sigma)
        pipe = pipe.with_settings(concept=concept, loss_scale=resolved[1], step_size=resolved[2], sigma=resolved[3],
                                  lazy_tolerance=lazy_tolerance)
    pipe.pipe.set_progress_bar_config(disable=True)
    if any(m in SLD_LEVELS for m in methods):
        check_sld(pipe)
    device, dtype = pipe.adapter.device, pipe.adapter.dtype
    # Before any folder records a run that cannot run; each steering method with the settings method_runner gives it.
    steering = [pipe.with_settings(mode=m).settings for m in STEERING_MODES if m in methods]
    size = check_runnable(pipe, steps, options.height, options.width, steering)
    if not toy:
        warn_of_an_unscaled_sigma(pipe, preset, options.sigma, *size)

    shared = {
        "benchmark": "trasce benchmark", "model": options.model, "world": "toy" if toy else "diffusers",
        "model_revision": model_revision(options.model) if loaded else None,
        "concept": concept, "steps": steps, "guidance_scale": guidance, "scheduler": type(pipe.pipe.scheduler).__name__,
        "dtype": str(dtype).removeprefix("torch."), "height": size[0], "width": size[1], "seed": options.seed,
        "prompt_source": prompt_source, "batch_size": options.batch_size, "device": str(device),
        "prompt_column": options.prompt_column,
        # a pipeline passed in keeps its own; it blacks out what it flags, and the judges see black images
        "safety_checker": pipe.adapter.has_safety_checker,
    }
    per_method = {m: method_settings(m, pipe, concept, preset) for m in methods}

    # Every folder's settings are checked before any is written or anything generated: a mismatch costs nothing.
    folders = {m: {s: RunFolder(out / m / s) for s in sets} for m in methods}

    def settings_of(method: str, split: str) -> dict[str, Any]:
        # The steering methods' lazy tolerance (None: exact), in their folders only: switching --exact
        # does not refuse the folders of methods that never steer.
        steering = {"lazy_tolerance": lazy_tolerance} if method in STEERING_MODES else {}
        return {**shared, "method": method, "method_settings": per_method[method], "prompt_set": split, **steering}

    for check_only in (() if options.overwrite else (True,)) + (False,):
        for method in methods:
            for split in sets:
                folder = folders[method][split]
                if options.overwrite:
                    folder.reset()
                folder.write_run_json(settings_of(method, split), force=options.overwrite, volatile=VOLATILE,
                                      check_only=check_only)
    # Each reads its folder's manifest once; a done image must still match its prompt.
    # A set that shrank (a smaller --n-target) keeps its other images, which no result counts.
    done = {(m, s): folders[m][s].done_for(sets[s], 1, f"prompt set {s}",
                                           lambda p, s=s: f"case {p.case} of prompt set {s}", extra_ok=True)
            for m in methods for s in sets}
    for (m, s), files in done.items():
        if m in GUIDANCE_OFF_MODES:
            check_guidance_off(folders[m][s], files)
    todo = {(m, s): [p for p in sets[s] if folders[m][s].image_file(p.case) not in done[m, s]]
            for m in methods for s in sets}
    for method in methods:  # what each folder is to hold, for trasce evaluate's count of missing images
        for split, prompts in sets.items():
            folders[method][split].record_requested(folders[method][split].image_file(p.case) for p in prompts)

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(v) for v in todo.values()), desc="benchmark", unit="img", disable=options.quiet,
               dynamic_ncols=True)
    with contextlib.closing(bar):
        for method in methods:
            if not any(todo[method, s] for s in sets):
                continue
            bar.set_postfix_str(method)
            runner = method_runner(method, pipe, concept, *size)
            # One untimed one-step call first, so no method's time includes first-call set-up costs.
            first = next(todo[method, s][0] for s in sets if todo[method, s])
            runner([first.prompt], *initial_noise(pipe, first.seed, 1, *size), [first.guidance_scale], 1)
            for split in sets:
                _generate(folders[method][split], todo[method, split], runner, pipe, method, split, concept, steps,
                          size, options.batch_size, bar)

    if toy:
        scores, features, judge_settings = _toy_evaluate(folders, sets, target["attribute"], target["value"])
    else:
        scores, features, judge_settings = _real_evaluate(folders, sets, judge_name, options.judge_options,
                                                          options.quiet)

    method_results: dict[str, Any] = {}
    for method in methods:
        seconds = []
        for split, folder in folders[method].items():
            records = {r["file"]: r for r in folder.read_manifest()}
            seconds += [records[folder.image_file(p.case)].get("seconds") for p in sets[split]]
        seconds = [s for s in seconds if s is not None]
        fid, why = fid_or_none(features.get(method), features.get("none"))
        if "none" not in methods:
            why = "the none method was not run"
        method_results[method] = {
            "description": METHODS[method],
            "settings": per_method[method],
            "prompt_sets": scores[method],
            "fid_vs_none": fid,
            **({"fid_vs_none_missing": why} if fid is None else {}),
            "seconds_per_image": sum(seconds) / len(seconds) if seconds else None,
            "timed_images": len(seconds),
        }

    judged_by = ("the embedded toy judge (trasce.toy.judge, shipped weights)" if toy
                 else f"the {judge_name} judge ({judge_settings.get('protocol') or 'see its settings'})")
    protocol = {
        "target_rate": (f"share of a prompt set's images in which {judged_by} sees {target['attribute']} = "
                        f"{target['value']} (argmax of its {target['attribute']} head); 95 % Wilson score interval"
                        if toy else f"share of a prompt set's images flagged by {judged_by} (imagenet: whose top-1 "
                                    "class is the Imagenette class the prompt names); 95 % Wilson score interval"),
        "fidelity": ("on the 'other' prompts: share of images in which the judge sees the value the prompt names "
                     f"(trasce.toy.captions.agreement), for {target['attribute']} and for every named attribute at "
                     "once" if toy else "on the 'other' prompts, only when the judge reports prompted values"),
        "fid": ("FID on the toy judge's penultimate features (JudgeNet trunk, mean- and max-pooled, 192 values) "
                "between each method's 'other' images and the none method's (same prompts and seeds); with fewer "
                "images than features the covariances are rank-deficient: compare methods with each other, not "
                "with Inception FIDs" if toy else "FID between each method's 'other' images and the none "
                "method's, only when the judge embeds images (e.g. --judge fid)"),
        "seconds_per_image": (f"wall-clock seconds of each generation call (denoising and decoding, synchronised) "
                              f"divided by its images, mean over the method's images, batches of up to "
                              f"{options.batch_size} on {_machine(device)['device']} ({shared['dtype']}); one untimed "
                              "one-step call per method first; times of earlier sessions of a resumed run are kept"),
        "noise": ("one CPU generator per prompt, seeded with the prompt's seed, draws the initial noise, then the "
                  "seed of the generator for what a stochastic scheduler adds (trasce.generate.initial_noise): "
                  f"prompt i of prompt set j has seed {options.seed} + {SEED_STRIDE} j + i (prompt files: the "
                  f"file's seeds, and {options.seed} for every row that gives none)"),
    }
    if any(m in SLD_LEVELS for m in methods):
        protocol["sld"] = ("diffusers' StableDiffusionPipelineSafe (deprecated in diffusers, run as is) on the same "
                           "components, safety_concept = the concept, SafetyConfig's sld_* arguments; its final "
                           "latents are decoded by the same adapter as the other methods'; it holds its latents "
                           "in the denoiser's dtype, as diffusers does, where the other methods hold them in float32")
    if toy:
        protocol["preset"] = (f"TraSCE settings of preset {preset!r} (auto-picked from the concept's attribute)"
                              if options.preset is None else f"TraSCE settings of preset {preset!r}")

    results = {
        "benchmark": "trasce benchmark",
        "concept": concept,
        "target": target,
        "settings": {**shared, "lazy_tolerance": lazy_tolerance, "preset": preset,
                     "loss_scale": pipe.settings.loss_scale, "step_size": pipe.settings.step_size,
                     "sigma": pipe.settings.sigma, "kernel": pipe.settings.kernel,
                     "split": options.split if toy else None, "n_target": options.n_target if toy else None,
                     "n_corner": options.n_corner, "n_other": options.n_other if toy else None,
                     "judge": judge_name, "judge_options": dict(options.judge_options),
                     "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}},
        "prompt_sets": {k: {"description": split_descriptions[k], "n": len(v),
                            "prompts": [asdict(p) for p in v]} for k, v in sets.items()},
        "judge": judge_settings,
        "methods": method_results,
        "protocol": protocol,
        "machine": _machine(device),
        "versions": {**package_versions(), "trasce_commit": commit},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results = json_ready(results)
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())
    from trasce.report import markdown_table

    header, rows = results_table(results)
    markdown = markdown_table(header, rows)
    # For a paper: the table under what made it, and the protocol of each column.
    protocol_lines = "".join(f"- **{key}**: {value}\n" for key, value in protocol.items())
    atomic_write_bytes(out / "results.md",
                       f"{caption(results, sets)}\n\n{markdown}\n\nProtocol:\n\n{protocol_lines}".encode())
    report = write_report(out, results, folders, sets, options.grid_rows)
    results["markdown"] = markdown
    results["report"] = str(report)
    return results
