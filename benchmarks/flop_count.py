"""How much arithmetic each `trasce bench` row does: its cost on a GPU that launch costs no longer slow.

    python benchmarks/flop_count.py --batch-size 4 --steps 50 --out flop-count.json

Where kernel launches set the pace (SD v1.4 at batch 4 on the GPUs measured so far), a row costs
what its launches cost (``op_count.py``). Where they do not (CUDA graphs, larger batches), it
costs about what its arithmetic costs. This counts that arithmetic in two parts:

1. *Which denoiser, text-encoder and VAE-decoder calls a row makes.* Each row runs for real on
   ``sd14-narrow`` (SD v1.4's topology with narrow layers, on the CPU, at 64 px) with every call's
   batch size recorded, and whether it carried gradients (each such call of trasce's sampler gets
   exactly one backward pass, with respect to its input only). Which calls a row makes depends on
   the topology and the branches, not on the widths or the image size.
2. *What each call costs at full size.* ``torch.utils.flop_counter`` counts the floating-point
   operations of those calls on SD v1.4's real architecture at ``--size`` pixels, built on the
   ``meta`` device (shapes only: nothing is computed, so the full size takes seconds).

FLOPs of matrix products, convolutions and attention are counted (the counter's coverage);
normalisations, activations and the scheduler's elementwise updates are not. They move memory
more than they compute, so a row's time on a GPU runs somewhat above its share of FLOPs. On the
meta device attention runs as the math path's matrix products, whose backward pass costs twice
the forward's; a GPU's flash attention also recomputes the attention scores in its backward pass
(half a forward's attention FLOPs more per image and backward pass, about 3 % more for the exact
path at 512 px). The released loop (fp32) is left out: its FLOPs run at a different rate.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode

from trasce import TraSCEPipeline
from trasce.bench import CONCEPT, FORCED_TOLERANCE, PROMPT
from trasce.models import random as random_models


def _batch(args, kwargs, name: str) -> int:
    return len(args[0] if args else kwargs[name])


class CallLog:
    """Records the calls a pipeline makes to its denoiser (``unet``, with or without gradients),
    text encoder and VAE decoder, as ``(part, batch)`` counts."""

    def __init__(self, pipe):
        self.calls: Counter = Counter()
        pipe.unet.register_forward_pre_hook(self._unet, with_kwargs=True)
        pipe.text_encoder.register_forward_pre_hook(self._part("text encoder", "input_ids"), with_kwargs=True)
        pipe.vae.decoder.register_forward_pre_hook(self._part("vae decoder", "z"), with_kwargs=True)

    def _unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        grad = torch.is_grad_enabled() and sample.requires_grad
        self.calls["unet, forward and backward" if grad else "unet, forward", len(sample)] += 1

    def _part(self, name: str, argument: str):
        def hook(module, args, kwargs):
            self.calls[name, _batch(args, kwargs, argument)] += 1
        return hook

    def of(self, call) -> Counter:
        self.calls = Counter()
        call()
        return self.calls


def full_size_flops(size: int) -> dict:
    """FLOPs of one call of each SD v1.4 part at ``size`` px, by ``(part, batch)``, counted on ``meta``."""
    pipe = random_models.build("sd14", device="meta")
    latent = (4, size // 8, size // 8)
    context = torch.zeros(1, 77, pipe.text_encoder.config.hidden_size, device="meta")
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)

    def unet(batch: int, backward: bool) -> None:
        x = torch.zeros(batch, *latent, device="meta", requires_grad=backward)
        with torch.set_grad_enabled(backward):
            out = pipe.unet(x, torch.tensor(999, device="meta"), encoder_hidden_states=context.expand(batch, -1, -1),
                            return_dict=False)[0]
        if backward:
            out.backward(torch.ones_like(out))  # (FlopCounterMode does not take autograd.grad)

    parts = {
        "unet, forward": lambda batch: unet(batch, False),
        "unet, forward and backward": lambda batch: unet(batch, True),
        "text encoder": lambda batch: pipe.text_encoder(torch.zeros(batch, 77, dtype=torch.long, device="meta")),
        "vae decoder": lambda batch: pipe.vae.decoder(torch.zeros(batch, *latent, device="meta")),
    }
    cache: dict = {}

    def flops(part: str, batch: int) -> int:
        if (part, batch) not in cache:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:  # (unet() sets its own grad mode)
                parts[part](batch)
            cache[part, batch] = counter.get_total_flops()
        return cache[part, batch]

    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="steps of the whole call whose FLOPs are reported")
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    pipe = random_models.build("sd14-narrow")
    pipe.set_progress_bar_config(disable=True)
    log = CallLog(pipe)
    trasce = TraSCEPipeline.from_pipe(pipe, concept=CONCEPT, loss_scale=1.0, step_size=1.0, sigma=1.0)
    prompts = [PROMPT] * args.batch_size
    rows = {
        "plain CFG (diffusers)": pipe,
        "trasce negation (part 1)": trasce.with_settings(mode="negation"),
        "trasce exact, two calls": trasce.with_settings(lazy_tolerance=None, one_call=False),
        "trasce exact, one call": trasce.with_settings(lazy_tolerance=None, one_call=True),
        "trasce lazy, benign (forced off)": trasce.with_settings(lazy_tolerance=FORCED_TOLERANCE["benign"]),
        **{f"trasce lazy, concept-near (forced on), {calls}": trasce.with_settings(
            lazy_tolerance=FORCED_TOLERANCE["concept-near"], one_call=calls == "one call")
           for calls in ("two calls", "one call")},
    }
    flops = full_size_flops(args.size)
    short = 2  # the first step of a lazy row differs (it measures the gradient's norm): per step = 2S - S
    results = []
    for name, row in rows.items():
        def run(steps: int, row=row) -> Counter:
            return log.of(lambda: row(prompts, num_inference_steps=steps, height=64, width=64,
                                      generator=torch.Generator().manual_seed(0)))

        calls_short, calls_long = run(short), run(2 * short)
        total = {key: sum(count * flops(*key) for key, count in calls.items())
                 for key, calls in (("short", calls_short), ("long", calls_long))}
        per_step = (total["long"] - total["short"]) / short
        once = total["short"] - short * per_step
        whole = once + args.steps * per_step
        step_calls = {key: (calls_long[key] - calls_short[key]) / short for key in calls_long}
        once_calls = {key: calls_short[key] - short * step_calls[key] for key in calls_long}
        results.append({"method": name,
                        **{what: {f"{part}, batch {batch}": n for (part, batch), n in calls.items() if n}
                           for what, calls in (("calls_per_step", step_calls), ("calls_once", once_calls))},
                        "tflops_per_step": per_step / 1e12, "tflops_once": once / 1e12,
                        f"tflops_per_image_at_{args.steps}_steps": whole / args.batch_size / 1e12})
    plain = results[0]
    for r in results:
        r["ratio_per_step"] = r["tflops_per_step"] / plain["tflops_per_step"]
        key = f"tflops_per_image_at_{args.steps}_steps"
        r[f"ratio_at_{args.steps}_steps"] = r[key] / plain[key]
        print(f"{r['method']:<48} {r['tflops_per_step']:7.2f} TFLOP/step, {r['ratio_per_step']:.2f}x plain per step, "
              f"{r[key]:6.1f} TFLOP/image, {r[f'ratio_at_{args.steps}_steps']:.2f}x at {args.steps} steps",
              flush=True)
    if args.out:
        result = {"model": "sd14", "calls_from": "sd14-narrow", "batch_size": args.batch_size, "size": args.size,
                  "steps": args.steps, "torch": torch.__version__, "diffusers": diffusers.__version__,
                  "counted": "torch.utils.flop_counter.FlopCounterMode on the meta device: matrix products, "
                  "convolutions, attention; forward and input-gradient backward",
                  "calls_once": "calls a whole call makes beyond steps x calls_per_step; the lazy benign row's "
                  "first step, which measures the gradient's norm, takes the place of one benign step (-1)",
                  "rows": results}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
