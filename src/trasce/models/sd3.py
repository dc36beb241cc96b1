"""Stable Diffusion 3 / 3.5: rectified flow, CLIP-L + CLIP-G + T5 (optional), ``SD3Transformer2DModel``.

Cost per step: plain CFG is 2 transformer passes (one batched call); TraSCE is 3, plus one
backward pass through the prompt and concept branches.

Why TraSCE's kernel carries over to a velocity model
----------------------------------------------------
A rectified flow noises as ``x_t = (1 - s) x0 + s eps`` at noise level ``s`` (the scheduler's
sigma, 1 -> 0) and the model predicts the velocity ``v = eps - x0``. The three branches share
``x_t``, so ``eps = x_t + (1 - s) v`` and ``x0 = x_t - s v`` give, exactly,

    eps_p - eps_c = (1 - s) (v_p - v_c)        x0_p - x0_c = -s (v_p - v_c)

``v_p = v_c`` exactly where ``eps_p = eps_c``: the place the kernel localizes around ("the prompt
predicts like the concept") is the same, and since the factor depends on ``t`` only, the steering
gradient points the same way; only the size of ``d`` changes, by ``1 / (1 - s)``. The sampler
keeps ``d = ||v_p - v_c||`` (``noise_scale`` is 1 for flow schedulers) on purpose: the
noise-equivalent ``(1 - s) ||v_p - v_c||`` is exactly 0 at the first step (``s = 1``) for *every*
prompt, so its kernel would be 1 there whatever the prompt. The velocity distance goes from the
``x0`` distance (``s -> 1``) to the ``eps`` distance (``s -> 0``) and stays local at every step.

Rescaling sigma (a rule of thumb, to calibrate): the published sigmas are for SD v1.4's
``||eps_p - eps_c||`` over a 4 x 64 x 64 latent (16,384 numbers). An L2 norm over n numbers of
similar size grows like ``sqrt(n)``, so start from ``sigma * sqrt(n / 16384)``: x4 for SD3 and
FLUX at 1024 x 1024 (16 x 128 x 128), x2 for SDXL at 1024 x 1024 (4 x 128 x 128). With that,
a velocity model's kernel equals the epsilon model's at the last steps and is up to ``1 / (1 - s)``
more local at the early ones (x2 at ``s = 0.5``); doubling sigma again matches mid-trajectory.
Then check on a few prompts: ``TraSCEOutput.min_distance`` of prompts that show the concept should
fall below sigma and that of unrelated prompts well above it. ``loss_scale`` and ``step_size``
need no rescaling for the kernel's sake.
"""

from __future__ import annotations

import torch

from trasce.models.base import Adapter
from trasce.sampler import Cond


class StableDiffusion3Adapter(Adapter):
    """``StableDiffusion3Pipeline``: 16-channel latents, ``FlowMatchEulerDiscreteScheduler``.

    ``max_sequence_length`` is the T5 token count (diffusers' default 256). Without T5
    (``text_encoder_3=None``) diffusers fills its part of the sequence with zeros, and so do we.
    """

    pipeline_classes = ("StableDiffusion3Pipeline",)
    family = "Stable Diffusion 3"
    denoiser_attribute = "transformer"

    options = ("max_sequence_length",)

    def __init__(self, pipe, max_sequence_length: int = 256):
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length

    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.pipe.transformer.config.patch_size

    def set_timesteps(self, scheduler, num_inference_steps: int, device: torch.device, height: int,
                      width: int) -> None:
        # As StableDiffusion3Pipeline: with dynamic shifting (SD3.5-style configs) the shift ``mu``
        # grows with the number of image tokens.
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch, f = self.pipe.transformer.config.patch_size, self.vae_scale_factor
            tokens = (height // f // patch) * (width // f // patch)
            kwargs["mu"] = calculate_shift(tokens, scheduler.config.get("base_image_seq_len", 256),
                                           scheduler.config.get("max_image_seq_len", 4096),
                                           scheduler.config.get("base_shift", 0.5),
                                           scheduler.config.get("max_shift", 1.16))
        retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)

    def encode(self, prompts: list[str]) -> Cond:
        # diffusers' own encoding: both CLIPs' penultimate states side by side, padded to T5's
        # width, then T5's tokens after them; the pooled embedding is both CLIPs' projections.
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.pipe.transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                     encoder_hidden_states=cond["encoder_hidden_states"],
                                     pooled_projections=cond["pooled_projections"], return_dict=False)[0]
