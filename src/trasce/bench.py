"""``trasce bench``: seconds per image of plain generation, the released loop and trasce's paths.

All rows run in one process on one device, on the same pipeline, so their ratios are fair. A
row's time is a whole call: prompt encoding, denoising and VAE decoding, synchronised, median
over ``repeats`` after one warm-up call.

*Benign* and *concept-near* prompts differ only in how often the backward pass runs. With random
weights the distance means nothing, so the two are emulated by forcing the lazy path's decision:
``lazy_tolerance=inf`` (the kernel is "off": after the first step, which measures the gradient
norm, no backward pass) and ``lazy_tolerance=0`` (the kernel is "on": a backward pass every step).
The exact path does not depend on the prompt. With a real model, pass real prompts instead.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trasce.models import StableDiffusionAdapter
from trasce.pipeline import DTYPES, TraSCEPipeline, load_diffusers_pipeline
from trasce.reference import released_loop


@dataclass
class BenchRow:
    method: str
    prompts: str
    dtype: str
    batch_size: int
    seconds_per_image: float
    ratio_to_plain: float | None
    peak_memory_gib: float | None
    note: str = ""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous devices need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` after one warm-up, and peak device memory (GiB) while it ran."""
    fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def load_for_bench(model: str, dtype: torch.dtype, device: torch.device):
    """A pipeline: a registered random architecture (``sd14``, ``sdxl``...) or a real model path/id."""
    from trasce.models import random as random_models

    if model in random_models.BUILDERS:
        return random_models.build(model, dtype=dtype, device=device)
    return load_diffusers_pipeline(model, torch_dtype=dtype).to(device)


def run_bench(model: str = "sd14", dtype: str = "fp16", batch_size: int = 4, steps: int = 50,
              height: int | None = None, width: int | None = None, device: str = "auto", repeats: int = 2,
              released: bool = True, prompt: str = "a photo of a mountain lake at dawn",
              concept: str = "naked, nude, bare, exposed", quiet: bool = False) -> dict:
    """Time every row; return ``{"machine": ..., "rows": [...]}`` (see ``BenchRow``)."""
    from trasce.generate import pick_device

    dev = pick_device(device)
    torch_dtype = DTYPES[dtype]
    pipe = load_for_bench(model, torch_dtype, dev)
    pipe.set_progress_bar_config(disable=True)
    trasce = TraSCEPipeline.from_pipe(pipe, concept=concept, loss_scale=1.0, step_size=1.0, sigma=1.0)
    h, w = height or trasce.adapter.default_size()[0], width or trasce.adapter.default_size()[1]
    prompts = [prompt] * batch_size
    # Pixel-space models (the embedded one) have no VAE: their latents are the images.
    pixel_space = getattr(pipe, "vae", None) is None
    common = dict(num_inference_steps=steps, height=h, width=w, output_type="latent" if pixel_space else "pil")

    def generator():
        return [torch.Generator().manual_seed(i) for i in range(batch_size)]

    rows: list[BenchRow] = []

    def add(method: str, kind: str, fn, batch: int, row_dtype: str = dtype, note: str = "") -> None:
        seconds, peak = _timed(fn, dev, repeats)
        rows.append(BenchRow(method, kind, row_dtype, batch, seconds / batch, None, peak, note))
        if not quiet:
            print(f"{method:>24} {kind:>13} {row_dtype} b{batch}: {seconds / batch:.3f} s/image", flush=True)

    add("plain CFG (diffusers)", "any", lambda: pipe(prompts, generator=generator(), **common), batch_size)
    add("negative prompt", "any", lambda: pipe(prompts, negative_prompt=[concept] * batch_size,
                                                generator=generator(), **common), batch_size)
    add("trasce negation", "any", lambda: trasce.with_settings(mode="negation")(prompts, generator=generator(),
                                                                               **common), batch_size)
    add("trasce exact", "any", lambda: trasce(prompts, generator=generator(), **common), batch_size)
    lazy_off = trasce.with_settings(lazy_tolerance=float("inf"))
    lazy_on = trasce.with_settings(lazy_tolerance=0.0)
    add("trasce lazy", "benign", lambda: lazy_off(prompts, generator=generator(), **common), batch_size,
        note="kernel forced off (emulated: random weights)")
    add("trasce lazy", "concept-near", lambda: lazy_on(prompts, generator=generator(), **common), batch_size,
        note="kernel forced on (emulated: random weights)")

    if released and isinstance(trasce.adapter, StableDiffusionAdapter):
        # The released script: fp32, batch 1, one three-branch call with gradients on all three.
        pipe32 = pipe if torch_dtype == torch.float32 else load_for_bench(model, torch.float32, dev)
        pipe32.set_progress_bar_config(disable=True)

        def released_call():
            embed = [pipe32.encode_prompt([t], dev, 1, False)[0] for t in ("", prompt, concept)]
            shape = (1, *trasce.adapter.latent_shape(h, w))
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev)
            final = released_loop(pipe32.unet, pipe32.scheduler, latents, *embed, steps, 7.5, 1.0, 1.0, 1.0)
            if pixel_space:
                return final
            with torch.no_grad():
                image = pipe32.vae.decode(final / pipe32.vae.config.scaling_factor).sample
            return pipe32.image_processor.postprocess(image)

        add("released loop", "any", released_call, 1, "fp32", note="literal transcription, batch 1")
        add("plain CFG (diffusers)", "any", lambda: pipe32(prompt, generator=torch.Generator().manual_seed(0),
                                                             **common), 1, "fp32")
        if pipe32 is not pipe:
            del pipe32

    plain = {(r.dtype, r.batch_size): r.seconds_per_image for r in rows if r.method == "plain CFG (diffusers)"}
    for r in rows:
        base = plain.get((r.dtype, r.batch_size))
        r.ratio_to_plain = round(r.seconds_per_image / base, 3) if base else None
    machine = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return {"model": model, "steps": steps, "height": h, "width": w, "repeats": repeats, "machine": machine,
            "rows": [asdict(r) for r in rows]}


def format_rows(result: dict) -> str:
    """A Markdown table of a ``run_bench`` result."""
    from trasce.report import markdown_table

    header = ["method", "prompts", "dtype", "batch", "s/image", "x plain (same dtype, batch)", "peak GiB"]
    rows = [[r["method"], r["prompts"], r["dtype"], r["batch_size"], f"{r['seconds_per_image']:.3f}",
             "" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.2f}",
             "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"] for r in result["rows"]]
    return markdown_table(header, rows)


def write_result(result: dict, path: Path) -> None:
    from trasce.runs import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
