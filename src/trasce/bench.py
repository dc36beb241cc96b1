"""``trasce bench``: seconds per image of plain generation, the released loop and trasce's paths.

All rows run in one process on one device, on the same pipeline, so their ratios are fair. A
row's time is a whole call: prompt encoding, denoising and VAE decoding, synchronised. Every row is
called once to warm up, then the rows take turns ``repeats`` times (round-robin, so that a drift in
the machine's speed touches every row alike) and each row reports its median. A row's peak memory
(CUDA only) is its model's weights plus the most memory its warm-up call allocated beyond the loaded
weights: the fp16 and fp32 pipelines are both loaded while the rows take turns. Rows compiled with CUDA
graphs (``CUDA_GRAPH_CHOICES``) report none: their graphs' memory, recorded by earlier calls (the
gradient check's among them), stays allocated across calls, so a warm-up finds most of it already
taken (an H200 run gave the two-call exact path 4.4 GiB, plain CFG's figure).

*Benign* and *concept-near* prompts differ only in how often the backward pass runs. With random
weights the distance means nothing, so the two are emulated by forcing the lazy path's decision:
``lazy_tolerance=inf`` (the kernel is "off": after the first step, which measures the gradient
norm, no backward pass) and ``lazy_tolerance=0`` (the kernel is "on": a backward pass every step).
The exact path does not depend on the prompt. With a trained model, ``benign_prompt`` and
``near_prompt`` replace the emulation: those rows then run the default lazy path on those prompts.

With ``compile_mode`` (a ``COMPILE_CHOICES`` name), plain CFG and trasce's rows run once more with the
denoiser swapped for ``torch.compile(denoiser, ...)`` during each call, and their ratios are to
compiled plain CFG.
The compiled steering rows are timed only if a compiled exact call passes trasce's gradient check
first, and no compiled row if that call fails otherwise; the result's ``compile`` entry says which.
``compiled_only`` leaves out the uncompiled rows other than the released loop and its fp32 plain CFG
(a second run beside an uncompiled one, when the device time is short: compiling takes minutes).

With ``channels_last``, plain CFG, the exact path and benign lazy rows run once more with the
denoiser's weights in channels-last memory format during each call (converting them is part of the
timed call, a copy of the convolution weights), and their ratios are to channels-last plain CFG;
the first such row's time against the ordinary plain CFG row's says whether the format pays.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from trasce.models import FluxAdapter, StableDiffusionAdapter
from trasce.models.base import compile_module
from trasce.pipeline import CUDA_GRAPH_CHOICES, DTYPES, TraSCEPipeline, compile_options, load_diffusers_pipeline
from trasce.reference import released_loop
from trasce.runs import refuse_several_processes, source_commit
from trasce.sampler import CompiledGradientError

PROMPT = "a photo of a mountain lake at dawn"
CONCEPT = "naked, nude, bare, exposed"
# With random weights the lazy decision is forced: no backward pass after the first step (benign),
# or one at every step (concept-near).
FORCED_TOLERANCE = {"benign": float("inf"), "concept-near": 0.0}
EMULATED = "emulated: the lazy decision forced {}"


def trasce_variants(trasce: TraSCEPipeline) -> dict[tuple[str, str], TraSCEPipeline]:
    """trasce's own paths as ``trasce bench`` times them, by ``(method, prompts)`` row.

    The lazy rows are the emulated ones, with trasce's default number of calls for the device; the
    exact rows name theirs. Checkpointing is a switch on the model, not a variant.
    """
    return {
        ("trasce negation", "any"): trasce.with_settings(mode="negation"),
        ("trasce exact, two calls", "any"): trasce.with_settings(lazy_tolerance=None, one_call=False),
        ("trasce exact, one call", "any"): trasce.with_settings(lazy_tolerance=None, one_call=True),
        **{("trasce lazy", kind): trasce.with_settings(lazy_tolerance=tolerance)
           for kind, tolerance in FORCED_TOLERANCE.items()},
    }


@dataclass
class BenchRow:
    method: str
    prompts: str
    dtype: str
    batch_size: int
    seconds_per_image: float | None  # None where the row failed (``error``) or was not timed yet
    ratio_to_plain: float | None
    peak_memory_gib: float | None  # the row's model weights plus its working memory
    backward_passes: float | None = None  # per image over the whole call, where the row steers
    settings: dict | None = None  # the EraseSettings of trasce's rows
    note: str = ""
    compile_mode: str | None = None  # the row's denoiser ran torch.compiled in this mode
    memory_format: str | None = None  # "channels_last" when the row's denoiser ran in that format
    error: str | None = None  # what the row raised; the other rows are still timed


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous devices need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _warm_up(fn, device: torch.device) -> tuple[object, float | None]:
    """Run ``fn()`` once; return its result and its working memory: the peak device memory above
    what was allocated before the call (the weights of every loaded model), in GiB, CUDA only."""
    if device.type != "cuda":
        return fn(), None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    return result, (torch.cuda.max_memory_allocated(device) - before) / 2**30


def weights_gib(pipe) -> float:
    """Size of a pipeline's parameters and buffers, in GiB."""
    tensors = [t for module in pipe.components.values() if isinstance(module, torch.nn.Module)
               for t in (*module.parameters(), *module.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def time_round_robin(calls: list, device: torch.device, repeats: int, progress=None,
                     errors: dict[int, str] | None = None) -> list[tuple[float | None, float | None, object]]:
    """``(median seconds, working GiB, warm-up result)`` of each call: one warm-up each, then ``repeats``
    rounds in turn. ``progress(rounds_done, measured)`` hears after each round, with the medians so far.

    With ``errors`` (a dict), a call that raises does not stop the others: its message is stored under
    its index, it is not called again, and its median is ``None``. Without, the error propagates.
    """
    failed = {} if errors is None else errors

    def guarded(i: int, run):
        try:
            return run()
        except Exception as error:  # an out-of-memory row, a compiler's failure: the other rows still count
            if errors is None:
                raise
            failed[i] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            return None

    warm = [guarded(i, lambda fn=fn: _warm_up(fn, device)) or (None, None) for i, fn in enumerate(calls)]
    times: list[list[float]] = [[] for _ in calls]
    measured = []
    for round_ in range(repeats):
        for i, fn in enumerate(calls):
            if i not in failed:
                times[i].append(guarded(i, lambda fn=fn: _seconds(fn, device)))
        measured = [(None if i in failed else statistics.median(t), peak, result)
                    for i, (t, (result, peak)) in enumerate(zip(times, warm, strict=True))]
        if progress:
            progress(round_ + 1, measured)
    return measured


def load_for_bench(model: str, dtype: torch.dtype, device: torch.device):
    """A pipeline: a registered random architecture (``sd14``, ``sdxl``...) or a real model path/id."""
    from trasce.models import random as random_models

    if model in random_models.BUILDERS:
        return random_models.build(model, dtype=dtype, device=device)
    # SD v1.x's PNDM becomes DDIM there; the safety checker would time a classifier, not generation
    return load_diffusers_pipeline(model, torch_dtype=dtype, safety_checker=False).to(device)


def run_bench(model: str = "sd14", dtype: str = "auto", batch_size: int = 4, steps: int = 50,
              height: int | None = None, width: int | None = None, device: str = "auto", repeats: int = 2,
              released: bool = True, prompt: str = PROMPT,
              concept: str | None = None, preset: str | None = None, benign_prompt: str | None = None,
              near_prompt: str | None = None, compile_mode: str | None = None, channels_last: bool = False,
              compiled_only: bool = False, quiet: bool = False, json_path: Path | None = None) -> dict:
    """Time every row; return ``{"machine": ..., "rows": [...]}`` (see ``BenchRow``).

    With ``json_path`` the result so far is written there after every round (``rounds_done``), so a
    run stopped on a short GPU lease keeps what it measured.

    The erasure settings are ``preset``'s, or lambda = eta = sigma = 1 with ``concept`` (default:
    the nudity concept text); ``prompt`` is the prompt of the rows that do not depend on it.
    """
    from trasce.generate import check_counts, check_runnable, check_size_flags, pick_device, pick_dtype
    from trasce.models import random as random_models

    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1 (timed rounds after the warm-up), got {repeats}")
    check_counts({"--steps": steps, "--batch-size": batch_size})
    check_size_flags(height, width)
    refuse_several_processes("trasce bench", "which would time each other on one machine; run it alone")
    if compiled_only and (compile_mode is None or channels_last or benign_prompt or near_prompt):
        raise ValueError("--compiled-only times the compiled rows (and the released loop) alone: it needs --compile, "
                         "and takes neither --channels-last nor real prompts (uncompiled rows)")
    if model in random_models.BUILDERS and (benign_prompt or near_prompt):
        raise ValueError(f"--benign-prompt and --near-prompt need a trained model; {model!r} has random weights, "
                         "whose benign and concept-near rows are emulated")
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)  # auto as trasce generate: CPU half precision is far slower than fp32
    dtype = next(name for name, value in DTYPES.items() if value == torch_dtype)
    pipe = load_for_bench(model, torch_dtype, dev)
    pipe.set_progress_bar_config(disable=True)
    erase = dict(preset=preset) if preset else dict(loss_scale=1.0, step_size=1.0, sigma=1.0)
    if concept is None and preset is None:
        concept = CONCEPT
    trasce = TraSCEPipeline.from_pipe(pipe, concept=concept, **erase)
    concept, erasing = trasce.concept, trasce.settings
    # Before any row is timed: a size or step count that every row would fail on.
    h, w = check_runnable(trasce, steps, height, width)
    prompts = [prompt] * batch_size
    batch_elements = batch_size * math.prod(trasce.adapter.latent_shape(h, w))
    # Pixel-space models (the embedded one) have no VAE: their latents are the images.
    pixel_space = getattr(pipe, "vae", None) is None
    # One CFG scale for every row, the released loop's too: the model's (how often lazy steering skips
    # depends on the trajectory it guides).
    scale = trasce.call_defaults["guidance_scale"]
    common = dict(num_inference_steps=steps, guidance_scale=scale, height=h, width=w,
                  output_type="latent" if pixel_space else "pil")

    def generator():
        return [torch.Generator().manual_seed(i) for i in range(batch_size)]

    def in_diffusers(negative: str | None = None):
        """A call of diffusers' own pipeline with CFG at ``scale`` (and ``negative`` as its negative prompt):
        FLUX.1-dev, guidance-distilled, runs it as true CFG at trasce's distilled guidance, as trasce does."""
        kwargs: dict = {} if negative is None else {"negative_prompt": [negative] * batch_size}
        if isinstance(trasce.adapter, FluxAdapter):
            kwargs = {"true_cfg_scale": scale, "negative_prompt": [negative or ""] * batch_size,
                      "guidance_scale": trasce.adapter.distilled_guidance}
        return lambda: pipe(prompts, generator=generator(), **{**common, **kwargs})

    rows: list[BenchRow] = []
    calls = []
    model_gib = {dtype: weights_gib(pipe)}  # each loaded pipeline's weights, by its dtype

    attribute = trasce.adapter.denoiser_attribute
    eager_denoiser = getattr(pipe, attribute)
    compiled_denoiser = None
    if compile_mode is not None:
        compiled_denoiser = compile_module(eager_denoiser, **compile_options(compile_mode))

    def with_compiled(fn):
        """``fn`` with the pipeline's denoiser swapped for the compiled one while it runs."""
        def call():
            setattr(pipe, attribute, compiled_denoiser)
            try:
                return fn()
            finally:
                setattr(pipe, attribute, eager_denoiser)
        return call

    def in_channels_last(fn):
        """``fn`` with the denoiser's weights in channels-last memory format while it runs."""
        def call():
            eager_denoiser.to(memory_format=torch.channels_last)
            try:
                return fn()
            finally:
                eager_denoiser.to(memory_format=torch.contiguous_format)
        return call

    def add(method: str, kind: str, fn, batch: int, row_dtype: str = dtype, note: str = "",
            settings: dict | None = None, compiled: str | None = None, memory_format: str | None = None) -> None:
        if compiled is not None:
            fn = with_compiled(fn)
        if memory_format is not None:
            fn = in_channels_last(fn)
        rows.append(BenchRow(method, kind, row_dtype, batch, 0.0, None, None, settings=settings, note=note,
                             compile_mode=compiled, memory_format=memory_format))
        calls.append(fn)

    def add_trasce(method: str, kind: str, variant: TraSCEPipeline, note: str = "", texts: list[str] = prompts,
                   compiled: str | None = None, memory_format: str | None = None) -> None:
        settings = asdict(variant.settings)
        if variant.settings.steers:  # with one_call=None, the choice for a step that steers every image
            settings["one_call"] = variant.settings.uses_one_call(dev, batch_elements, compiled in CUDA_GRAPH_CHOICES)
        add(method, kind, lambda: variant(texts, generator=generator(), **common), batch_size, note=note,
            settings=settings, compiled=compiled, memory_format=memory_format)

    variants = trasce_variants(trasce)
    exact, benign = variants["trasce exact, two calls", "any"], variants["trasce lazy", "benign"]
    if not compiled_only:
        add("plain CFG (diffusers)", "any", in_diffusers(), batch_size)
        add("negative prompt", "any", in_diffusers(concept), batch_size)
        for method in ("trasce negation", "trasce exact, two calls", "trasce exact, one call"):
            add_trasce(method, "any", variants[method, "any"])
        if getattr(trasce.adapter.denoiser_module, "_supports_gradient_checkpointing", False):
            def checkpointed():
                exact.enable_gradient_checkpointing()
                try:
                    return exact(prompts, generator=generator(), **common)
                finally:
                    exact.disable_gradient_checkpointing()

            add("trasce exact, two calls, checkpointed", "any", checkpointed, batch_size,
                settings=asdict(exact.settings), note="gradient checkpointing in the denoiser")
        for kind, real_prompt, state in (("benign", benign_prompt, "off"), ("concept-near", near_prompt, "on")):
            if real_prompt:
                add_trasce("trasce lazy", kind, trasce, note=f"prompt {real_prompt!r}",
                           texts=[real_prompt] * batch_size)
            else:
                add_trasce("trasce lazy", kind, variants["trasce lazy", kind], note=EMULATED.format(state))

    compile_check = None
    if compile_mode is not None:
        try:
            # Compiles the no-gradient and gradient calls, and runs trasce's check of the backward pass.
            with_compiled(lambda: exact(prompts, generator=generator(), **common))()
            compile_check = "passed"
        except CompiledGradientError as error:
            compile_check = f"failed: {error}"
        except Exception as error:  # a compiler's failure is a result to report, not a reason to lose every row
            compile_check = f"did not run: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
        if not compile_check.startswith("did not run"):
            add("plain CFG (diffusers)", "any", in_diffusers(), batch_size,
                compiled=compile_mode)
            add_trasce("trasce negation", "any", variants["trasce negation", "any"], compiled=compile_mode)
        if compile_check == "passed":
            add_trasce("trasce exact, two calls", "any", exact, compiled=compile_mode)
            add_trasce("trasce exact, one call", "any", variants["trasce exact, one call", "any"],
                       compiled=compile_mode)
            add_trasce("trasce lazy", "benign", benign, note=EMULATED.format("off"), compiled=compile_mode)

    if channels_last:
        format_ = "channels_last"
        add("plain CFG (diffusers)", "any", in_diffusers(), batch_size,
            memory_format=format_)
        add_trasce("trasce exact, two calls", "any", exact, memory_format=format_)
        add_trasce("trasce lazy", "benign", benign, note=EMULATED.format("off"), memory_format=format_)

    if released and isinstance(trasce.adapter, StableDiffusionAdapter):
        # The released script: fp32, batch 1, one three-branch call with gradients on all three.
        pipe32 = pipe if torch_dtype == torch.float32 else load_for_bench(model, torch.float32, dev)
        pipe32.set_progress_bar_config(disable=True)
        model_gib["fp32"] = weights_gib(pipe32)

        def released_call():
            embed = [pipe32.encode_prompt([t], dev, 1, False)[0] for t in ("", prompt, concept)]
            shape = (1, *trasce.adapter.latent_shape(h, w))
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev)
            final = released_loop(pipe32.unet, pipe32.scheduler, latents, *embed, steps, scale, erasing.loss_scale,
                                  erasing.step_size, erasing.sigma)
            if not pixel_space:
                with torch.no_grad():
                    image = pipe32.vae.decode(final / pipe32.vae.config.scaling_factor).sample
                pipe32.image_processor.postprocess(image)
            # One backward pass (through all three branches) per step.
            return SimpleNamespace(steered_steps=torch.tensor([steps]))

        add("released loop", "any", released_call, 1, "fp32", note="literal transcription, batch 1")
        if compiled_only or (dtype, batch_size) != ("fp32", 1):  # else the first plain CFG row is this one
            add("plain CFG (diffusers)", "any", lambda: pipe32(prompt, generator=torch.Generator().manual_seed(0),
                                                                 **common), 1, "fp32")

    machine = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "trasce_commit": source_commit(),
    }

    def setup(r: BenchRow) -> tuple:
        """What a row's plain CFG baseline must share with it."""
        return r.dtype, r.batch_size, r.compile_mode, r.memory_format

    def summary(rounds_done: int, measured: list) -> dict:
        for i, (row, (seconds, working, output)) in enumerate(zip(rows, measured, strict=True)):
            row.seconds_per_image = None if seconds is None else seconds / row.batch_size
            graphs = row.compile_mode in CUDA_GRAPH_CHOICES
            row.peak_memory_gib = None if working is None or graphs else model_gib[row.dtype] + working
            steered = getattr(output, "steered_steps", None)
            row.backward_passes = None if steered is None else steered.float().mean().item()
            row.error = errors.get(i)
        plain = {setup(r): r.seconds_per_image for r in rows if r.method == "plain CFG (diffusers)"}
        for r in rows:
            base = plain.get(setup(r))
            r.ratio_to_plain = round(r.seconds_per_image / base, 3) if base and r.seconds_per_image else None
        result = {"model": model, "steps": steps, "guidance_scale": scale, "height": h, "width": w, "repeats": repeats,
                  "rounds_done": rounds_done, "machine": machine, "rows": [asdict(r) for r in rows]}
        if compile_mode is not None:
            result["compile"] = {"mode": compile_mode, "gradient_check": compile_check}
        return result

    def progress(rounds_done: int, measured: list) -> None:
        if json_path is not None:  # a run stopped later keeps its rounds so far
            write_result(summary(rounds_done, measured), json_path)
        if not quiet and rounds_done:
            print(f"timed round {rounds_done}/{repeats}", flush=True)

    errors: dict[int, str] = {}
    progress(0, [(None, None, None)] * len(calls))  # replaces an earlier run's JSON before anything is timed
    measured = time_round_robin(calls, dev, repeats, progress, errors)
    return summary(repeats, measured)


def format_rows(result: dict) -> str:
    """A Markdown table of a ``run_bench`` result."""
    from trasce.report import markdown_table

    header = ["method", "prompts", "dtype", "batch", "s/image", "x plain (same dtype, batch, compile, format)",
              "peak GiB", "backward passes per image"]
    rows = [[r["method"] + (f", compiled ({r['compile_mode']})" if r.get("compile_mode") else "")
             + (", channels-last" if r.get("memory_format") else ""), r["prompts"],
             r["dtype"], r["batch_size"],
             "failed" if r.get("error") else "" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.3f}",
             "" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.2f}",
             "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
             "" if r.get("backward_passes") is None else f"{r['backward_passes']:g}"] for r in result["rows"]]
    failures = "".join(f"\n{r['method']} ({r['prompts']}) failed: {r['error']}" for r in result["rows"]
                       if r.get("error"))
    return markdown_table(header, rows) + failures


def json_ready(value):
    """``value`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``: JSON has no such
    numbers, and ``null`` would read as "not set" (a lazy tolerance of ``inf`` is not ``None``, exact)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def write_result(result: dict, path: Path) -> None:
    from trasce.runs import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n").encode())
