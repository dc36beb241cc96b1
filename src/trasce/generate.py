"""The generation job behind ``trasce generate``: prompt rows in, a resumable run folder out.

Every image is written (atomically) and recorded in the manifest as soon as it exists; a second
run into the same folder skips what is done. Each image's noise comes from a CPU generator
seeded by its row, so an image is the same whatever batch or process made it, on any device
for the same dtype; so is the noise that stochastic schedulers (``euler-a``) add at each step. Under
``accelerate launch`` each process takes every N-th row.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trasce import data
from trasce.data import PromptRow
from trasce.pipeline import (
    DTYPES,
    NonFiniteImageWarning,
    TraSCEPipeline,
    compile_options,
    is_toy_model,
    model_call_defaults,
    model_revision,
)
from trasce.runs import RunFolder, atomic_save_image, check_run_place, failing_together
from trasce.sampler import DEFAULT_LAZY_TOLERANCE, EraseSettings, check_scheduler

# The run settings that each manifest line repeats, so that an image's line alone says how it was made.
IMAGE_SETTINGS = ("loss_scale", "step_size", "sigma", "kernel", "steer_window", "steps", "scheduler", "dtype", "model")


@dataclass
class GenerateOptions:
    """Everything ``trasce generate`` takes; field names are the CLI's options."""

    out: Path
    model: str = "toy"
    concept: str | None = None
    preset: str | None = None
    prompt: list[str] = field(default_factory=list)
    prompts: Path | None = None
    prompt_column: str | None = None  # None: the first of data.PROMPT_COLUMNS a row has
    mode: str = "trasce"
    loss_scale: float | None = None
    step_size: float | None = None
    sigma: float | None = None
    kernel: str = "exp"
    lazy_tolerance: float | None = DEFAULT_LAZY_TOLERANCE
    exact: bool = False
    one_call: bool | None = None  # None: chosen per step (EraseSettings.uses_one_call)
    steer_window: tuple[float, float] = (0.0, 1.0)
    gradient_checkpointing: bool = False
    compile_mode: str | None = None  # a pipeline.COMPILE_CHOICES name; None: not compiled
    safety_checker: bool = False  # keep an SD 1.x/2.x model's safety checker (load_diffusers_pipeline)
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int = 42
    images_per_prompt: int = 1
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    height: int | None = None
    width: int | None = None
    start: int | None = None
    end: int | None = None
    quiet: bool = False
    overwrite: bool = False


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, else Apple's MPS, else the CPU; a named device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    available = {"cuda": torch.cuda.is_available, "mps": _mps_available}.get(device.type, lambda: True)
    if not available():
        raise ValueError(f"device {name!r} is not available on this machine (torch {torch.__version__}); "
                         "give --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere (CPU half precision is slow and MPS bf16 partial)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def hide_loading_bars() -> None:
    """Turn off diffusers' and transformers' progress bars of model loading ("Loading ...")."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


# The modes that stand for diffusers' own pipelines take the prompt's prediction alone at CFG scales of
# 1 or less, as diffusers does; before trasce did, they guided such images below 1. An image made since
# carries this mark in the manifest, so that a folder holding images made before is not resumed into
# a mixture of the two.
GUIDANCE_OFF_MODES = ("none", "negative_prompt")
GUIDANCE_OFF = "guidance_off_at_or_below_one"


def check_guidance_off(folder: RunFolder, done: set[str]) -> None:
    """``RunFolderError`` when a done image of a ``GUIDANCE_OFF_MODES`` run, at a scale of 1 or less, lacks the mark."""
    from trasce.runs import RunFolderError

    before = sorted(record["file"] for record in folder.read_manifest() if record["file"] in done
                    and record["guidance_scale"] <= 1 and not record.get(GUIDANCE_OFF))
    if before:
        raise RunFolderError(
            f"{folder.path / before[0]} ({len(before)} image{'s' if len(before) > 1 else ''} in all) was made at a CFG "
            "scale of 1 or less before trasce took the prompt's prediction alone there, as diffusers does; delete "
            "those images to make them again, or use a new output folder, or --overwrite")


def warn_of_other_prompt_columns(rows: list, path: Path | None, prompt_column: str | None, show: bool) -> None:
    """Say which column the prompts came from when a file holds several prompt columns and none was named
    (an attack file may keep the original prompt in ``prompt`` beside the adversarial one)."""
    others = data.other_prompt_columns(rows)
    if others and prompt_column is None and show:
        read = sorted({row.prompt_column for row in rows})
        print(f"warning: {path} has the prompt columns {', '.join(map(repr, sorted({*read, *others})))}; the "
              f"prompts are read from {' and '.join(map(repr, read))} (the first of "
              f"{', '.join(map(repr, data.PROMPT_COLUMNS))} that a row has), the others kept as data; give "
              "--prompt-column to read another", file=sys.stderr)


def read_rows(options: GenerateOptions, default_guidance: float) -> list[PromptRow]:
    """Every prompt row of ``--prompts`` or ``--prompt``, validated, before anything is generated."""
    if options.prompts is not None and options.prompt:
        raise ValueError("give --prompt or --prompts, not both")
    if not 0 <= options.seed <= data.MAX_SEED:  # the CLI's IntRange checks it too; this is for the API
        raise ValueError(f"--seed {options.seed} is out of range; {data.SEED_RANGE}")
    if options.prompt_column is not None and options.prompts is None:
        raise ValueError("--prompt-column names a column of --prompts FILE; there is none")
    if options.prompts is not None:
        rows = data.read_prompts(options.prompts, options.seed, default_guidance, options.prompt_column)
    elif options.prompt:
        rows = []
        for i, text in enumerate(options.prompt):
            if not text.strip():
                raise ValueError(f"--prompt number {i + 1} is empty")
            rows.append(PromptRow(case=f"{i:05d}", prompt=text.strip(), seed=options.seed,
                                  guidance_scale=default_guidance, row=i + 1, extra={}))
    else:
        raise ValueError("nothing to generate: give --prompt TEXT or --prompts FILE")
    return rows


def select_rows(rows: list[PromptRow], options: GenerateOptions) -> list[PromptRow]:
    """The rows ``--start``/``--end`` select; refused when none."""
    selected = data.select(rows, options.start, options.end)
    if not selected:
        bounds = " ".join(f"--{name} {value}" for name, value in (("start", options.start), ("end", options.end))
                          if value is not None)
        raise ValueError(f"{bounds} selects none of the {len(rows)} prompts of {options.prompts or '--prompt'} "
                         "(they count from 0, header excluded)")
    return selected


def initial_noise(pipe: TraSCEPipeline, seed: int, count: int, height: int, width: int
                  ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """One row's ``count`` starting noises, and per image a CPU generator for the noise its scheduler adds.

    Both come from one CPU generator seeded by the row: the noises first (as diffusers'
    ``num_images_per_prompt`` draws them), then a seed for each image's own generator.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (count, *pipe.adapter.latent_shape(height, width))
    noise = torch.randn(shape, generator=generator, dtype=pipe.adapter.dtype)
    seeds = torch.randint(0, 2**62, (count,), generator=generator).tolist()
    return noise, [torch.Generator().manual_seed(s) for s in seeds]


def check_runnable(pipe: TraSCEPipeline, steps: int, height: int | None, width: int | None,
                   settings: Iterable[EraseSettings] = ()) -> tuple[int, int]:
    """The image size (``Adapter.image_size``), once the run is known to be possible, before a run folder
    records it: ``ValueError`` for a size the family cannot make, a scheduler that would drop the steering of
    any of ``settings`` (``check_scheduler``), or ``steps`` the scheduler cannot make (more than its training
    timesteps, say; the timesteps are set on a copy as the family sets them: a FLUX or SD3 scheduler shifts
    them by the image size)."""
    height, width = pipe.adapter.image_size(height, width)
    for erasing in settings:
        check_scheduler(pipe.pipe.scheduler, erasing, steps)
    try:
        pipe.adapter.set_timesteps(copy.deepcopy(pipe.pipe.scheduler), steps, torch.device("cpu"), height, width)
    except ValueError as error:
        raise ValueError(f"--steps {steps}: {' '.join(str(error).split())}") from None
    return height, width


def check_lazy_tolerance(tolerance: float | None) -> None:
    """Refuse a ``--lazy-tolerance`` below 0 (or NaN); ``None`` is exact."""
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"--lazy-tolerance must be at least 0 (or give --exact), got {tolerance:g}")


def check_counts(counts: dict[str, int | None]) -> None:
    """Refuse a count option (``{"--steps": 0}``) below 1; ``None`` is left out, so its default applies."""
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")


def check_size_flags(height: int | None, width: int | None) -> None:
    """Refuse a ``--height``/``--width`` that no family can make, before the model is loaded (the family's own
    multiple is checked once it is, by ``Adapter.image_size``: SD3 and FLUX take multiples of 16)."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")


def warn_of_an_unscaled_sigma(pipe: TraSCEPipeline, preset: str | None, sigma: float | None, height: int,
                              width: int) -> None:
    """A published preset's sigma is for SD v1.4's 4x64x64 latent: say so where the latent is much larger or
    smaller and no ``--sigma`` was given (the rule of thumb in ``trasce.models.sd3`` scales it)."""
    if preset is None or preset.startswith("toy-") or sigma is not None:
        return
    ratio = math.prod(pipe.adapter.latent_shape(height, width)) / (4 * 64 * 64)
    if not 0.8 <= ratio <= 1.25:
        print(f"warning: preset {preset!r}'s sigma {pipe.settings.sigma:g} is for SD v1.4's 4x64x64 latent; "
              f"this model's latent at {height}x{width} holds {ratio:.3g}x as many numbers, so its distances run "
              f"about {ratio ** 0.5:.3g}x as large: start from --sigma {pipe.settings.sigma * ratio ** 0.5:.3g} "
              "and check the manifest's min_distance on a few prompts", file=sys.stderr)


def batches(items: list, size: int) -> Iterator[list]:
    """``items`` in consecutive chunks of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run(options: GenerateOptions, pipe: TraSCEPipeline | None = None) -> RunFolder:
    """Generate every image that is not done yet; return the run folder."""
    from accelerate import PartialState

    # Without CUDA, accelerate only forms a multi-process group when asked for the CPU explicitly.
    state = PartialState(cpu=options.device == "cpu" or not torch.cuda.is_available())
    device = state.device if state.num_processes > 1 else pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    defaults = pipe.call_defaults if pipe is not None else model_call_defaults(options.model)
    guidance_default = options.guidance_scale if options.guidance_scale is not None else defaults["guidance_scale"]
    all_rows = read_rows(options, guidance_default)
    rows = select_rows(all_rows, options)
    check_counts({"--images-per-prompt": options.images_per_prompt, "--batch-size": options.batch_size,
                  "--steps": options.steps})
    if not math.isfinite(guidance_default):
        raise ValueError(f"--guidance-scale must be a finite number, got {guidance_default}")
    start, end = options.steer_window
    if not 0 <= start <= end <= 1:
        raise ValueError(f"--steer-window must be START END with 0 <= START <= END <= 1 (fractions of the steps), "
                         f"got {start:g} {end:g}")
    check_lazy_tolerance(options.lazy_tolerance)
    check_size_flags(options.height, options.width)
    check_run_place(options.out, "trasce generate", holds_runs=False)

    warn_of_other_prompt_columns(rows, options.prompts, options.prompt_column, state.is_main_process)
    if options.prompts is not None and state.is_main_process:
        for line in data.defaulted_cells(all_rows, options.prompts):
            print(f"warning: {line}", file=sys.stderr)
    toy_preset = (options.preset or "").startswith("toy-")
    if options.preset and toy_preset != is_toy_model(options.model) and state.is_main_process:
        made_for = "the embedded model" if toy_preset else "Stable Diffusion v1.4"
        print(f"warning: preset {options.preset!r} holds settings chosen for {made_for}, not for this model "
              f"({options.model}); give --loss-scale, --step-size and --sigma, or a preset made for it",
              file=sys.stderr)
    if options.quiet:
        hide_loading_bars()
    loaded = pipe is None  # (a pipeline passed in need not be options.model's)
    if pipe is None:
        pipe = TraSCEPipeline.from_pretrained(
            options.model, torch_dtype=dtype, scheduler=options.scheduler, safety_checker=options.safety_checker,
            concept=options.concept, preset=options.preset, mode=options.mode, loss_scale=options.loss_scale,
            step_size=options.step_size, sigma=options.sigma, kernel=options.kernel,
            lazy_tolerance=None if options.exact else options.lazy_tolerance, one_call=options.one_call,
            steer_window=tuple(options.steer_window),
        ).to(device)
    if options.safety_checker and not pipe.adapter.has_safety_checker:
        raise ValueError(f"--safety-checker: this model ({type(pipe.pipe).__name__}) has no safety checker to keep "
                         "(among diffusers' pipelines, Stable Diffusion 1.x/2.x ones may carry one, if their folder "
                         "ships it); leave the flag out")
    if options.gradient_checkpointing:
        pipe.enable_gradient_checkpointing()
    if options.compile_mode and not pipe.adapter.compiled:
        pipe.compile(**compile_options(options.compile_mode))
    pipe.pipe.set_progress_bar_config(disable=True)
    steps = options.steps if options.steps is not None else defaults["steps"]
    # Before run.json records a run that cannot run:
    height, width = check_runnable(pipe, steps, options.height, options.width, [pipe.settings])
    if state.is_main_process:
        warn_of_an_unscaled_sigma(pipe, options.preset, options.sigma, height, width)

    folder = RunFolder(options.out)
    settings = {
        "model": options.model, "world": "toy" if is_toy_model(options.model) else "diffusers",
        "concept": pipe.concept, "preset": options.preset, "mode": pipe.settings.mode,
        "loss_scale": pipe.settings.loss_scale, "step_size": pipe.settings.step_size, "sigma": pipe.settings.sigma,
        "kernel": pipe.settings.kernel, "lazy_tolerance": pipe.settings.lazy_tolerance,
        "one_call": pipe.settings.one_call, "steer_window": list(pipe.settings.steer_window),
        "gradient_checkpointing": options.gradient_checkpointing,
        # whether one ran (a wrapped pipeline keeps its own): it blacks out the images it flags
        "safety_checker": pipe.adapter.has_safety_checker,
        "compile_mode": options.compile_mode or ("compiled by the caller" if pipe.adapter.compiled else None),
        "steps": steps,
        "guidance_scale": guidance_default, "scheduler": type(pipe.pipe.scheduler).__name__,
        "images_per_prompt": options.images_per_prompt, "dtype": str(dtype).removeprefix("torch."),
        "height": height, "width": width, "prompts": str(options.prompts) if options.prompts else None,
        "prompt": list(options.prompt), "prompt_column": options.prompt_column, "seed": options.seed,
        "start": options.start, "end": options.end, "batch_size": options.batch_size, "device": str(device),
        "num_processes": state.num_processes,
    }
    is_main = state.is_main_process
    with failing_together(state):  # a refused run.json stops every process with its message
        if is_main:
            if options.overwrite:
                folder.reset()
            # The weights themselves, so that a model changed under its name is not mixed into a resumed run.
            settings["model_revision"] = model_revision(options.model) if loaded else None
            folder.write_run_json(settings, force=options.overwrite)
            folder.remove_stale_temp_files()  # what a killed run left half-written
    n = options.images_per_prompt
    done = folder.done_for(all_rows, n, options.prompts or "the --prompt values",
                           lambda row: f"row {row.row} of {options.prompts} (case {row.case})" if options.prompts
                           else f"--prompt number {row.row}")
    if pipe.settings.mode in GUIDANCE_OFF_MODES:
        check_guidance_off(folder, done)
    if is_main:  # after done_for: a session refused for its rows asks for nothing
        folder.record_requested(folder.image_file(row.case, k, n) for row in rows for k in range(n))
    if is_main and not options.quiet and all(folder.image_file(row.case, k, n) in done
                                             for row in rows for k in range(n)):
        count = len(rows) * n  # (every process's: each holds every row and what is done)
        print(f"generate: nothing to make; the {count} image{'s' if count != 1 else ''} asked for "
              f"{'are' if count != 1 else 'is'} in {folder.path} already", file=sys.stderr)
    rows = data.shard(rows, state.process_index, state.num_processes)
    todo = [(row, k) for row in rows for k in range(n) if folder.image_file(row.case, k, n) not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=options.quiet or not is_main or not todo,
               dynamic_ncols=True)
    noise_cache: dict[str, tuple[torch.Tensor, list[torch.Generator]]] = {}
    with contextlib.closing(bar):
        for batch in batches(todo, options.batch_size):
            latents, generators = [], []
            for row, k in batch:
                if row.case not in noise_cache:
                    noise_cache = {row.case: initial_noise(pipe, row.seed, n, height, width)}
                noise, step_generators = noise_cache[row.case]
                latents.append(noise[k])
                generators.append(step_generators[k])
            with warnings.catch_warnings():  # an image that overflowed is refused below, with its row
                warnings.simplefilter("ignore", NonFiniteImageWarning)
                out = pipe([row.prompt for row, _ in batch], num_inference_steps=steps,
                           guidance_scale=[row.guidance_scale for row, _ in batch], latents=torch.stack(latents),
                           generator=generators, height=height, width=width, output_type="pil")
            overflowed = []
            for i, (row, k) in enumerate(batch):
                if not out.finite[i]:  # a black image would be judged as any other: by a nudity judge, as erased
                    overflowed.append(row)
                    continue
                atomic_save_image(folder.image_path(row.case, k, n), out.images[i])
                record = {
                    "file": folder.image_file(row.case, k, n), "case": row.case, "k": k, "prompt": row.prompt,
                    "seed": row.seed, "guidance_scale": row.guidance_scale, "mode": pipe.settings.mode,
                    "concept": pipe.concept, "row": row.row, "extra": row.extra,
                    "settings": {key: settings[key] for key in IMAGE_SETTINGS},
                    **out.stats(i),
                    **({GUIDANCE_OFF: True} if pipe.settings.mode in GUIDANCE_OFF_MODES and row.guidance_scale <= 1
                       else {}),
                }
                folder.append_manifest(record)
                bar.update(1)
            if overflowed:
                row = overflowed[0]
                half = pipe.adapter.dtype == torch.float16
                raise ValueError(
                    f"case {row.case!r} ({row.prompt!r}, seed {row.seed}, CFG {row.guidance_scale:g}"
                    f"{f', line {row.row} of {options.prompts}' if options.prompts else ''}): its final latent holds "
                    f"NaN or inf (an overflow: a guidance scale or step size this large{', or fp16' if half else ''}"
                    "), so its image would be black or garbled; it was not saved (the other images made are kept). "
                    "Give the row a usual CFG scale (1 to 20) and run again to resume"
                    + (", or make the run in bf16 or fp32 (--dtype, in a new folder or with --overwrite)" if half
                       else ""))
    return folder
