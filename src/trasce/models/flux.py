"""FLUX.1-dev: a guidance-distilled rectified flow with ``FluxTransformer2DModel`` (CLIP-L + T5).

FLUX.1-dev was distilled to take the guidance strength as an input (``guidance``, diffusers'
``guidance_scale``, default 3.5) and runs one transformer pass per step, with no unconditional
branch. TraSCE needs real classifier-free guidance, with an unconditional and a concept branch,
so it runs FLUX the way diffusers' ``true_cfg_scale`` with a ``negative_prompt`` does: every branch
is a full pass at the distilled guidance ``distilled_guidance``, and TraSCEPipeline's
``guidance_scale`` is the true-CFG scale (FLUX users pick small values, about 1.5 to 4, not SD's
7.5). Mode ``none`` is then diffusers' ``true_cfg_scale=s, negative_prompt=""``.

Cost per step, against plain FLUX.1-dev (1 pass): true CFG or conventional negative prompting is
2 passes, TraSCE's negation 3, and full TraSCE 3 passes plus one backward pass through two of
them (a backward pass with respect to the input costs about 1.15 forward passes, as counted for SD
v1.4 in docs/speed.md): about 5.3 passes' worth of a 12B-parameter transformer per step. For
comparison, SD v1.4's TraSCE measured 3.2x its 2-pass CFG (TRASCE.md).

Models distilled to run with no classifier-free guidance at all (FLUX.1-schnell, SDXL-Turbo, LCM
at CFG 1) cannot be steered this way: their unconditional and concept branches carry no signal
that the guidance was trained to use.

Latents: diffusers packs FLUX latents ``(B, C, h, w)`` into 2x2 patches ``(B, h/2 * w/2, 4C)``.
This adapter keeps them unpacked between steps and packs them only around the transformer call.
Packing is a permutation and the flow scheduler's step is elementwise, so the trajectory is
diffusers' own (``TraSCEPipeline``'s latents and ``output_type="latent"`` are unpacked; use
``FluxPipeline._pack_latents`` to compare with diffusers), and the latent's grid gives the
image-position ids without any state. The distance ``d`` is on the velocity; see
``trasce.models.sd3`` for why the kernel carries over and how to rescale sigma.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from trasce.models.base import Adapter
from trasce.sampler import Cond


class FluxAdapter(Adapter):
    """``FluxPipeline``: ``distilled_guidance`` is the embedded guidance (diffusers' ``guidance_scale``).

    ``max_sequence_length`` is the T5 token count (diffusers' default 512).
    """

    pipeline_classes = ("FluxPipeline",)
    family = "FLUX.1"
    denoiser_attribute = "transformer"

    options = ("distilled_guidance", "max_sequence_length")

    def __init__(self, pipe, distilled_guidance: float = 3.5, max_sequence_length: int = 512):
        super().__init__(pipe)
        self.distilled_guidance = distilled_guidance
        self.max_sequence_length = max_sequence_length
        if not pipe.transformer.config.guidance_embeds:
            warnings.warn("this FLUX transformer has no guidance embedding (FLUX.1-schnell?): schnell is distilled to "
                          "run without classifier-free guidance, so TraSCE's branches carry no signal to steer by",
                          stacklevel=2)

    @classmethod
    def call_defaults(cls, pipeline_class: type) -> dict[str, float | int]:
        """FluxPipeline's 28 steps, and true CFG at 3.5.

        FluxPipeline's own ``guidance_scale`` (3.5) is the distilled guidance and its ``true_cfg_scale``
        is 1 (off); here ``guidance_scale`` is the true-CFG scale, and SD's 7.5 would over-saturate.
        3.5 is within the usual range and equal to the distilled guidance it runs at.
        """
        return {**super().call_defaults(pipeline_class), "guidance_scale": 3.5}

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.vae_scale_factor
        return size, size

    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # latents are cut into 2x2 patches

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.pipe.transformer.config.in_channels // 4, height // f, width // f)

    def set_timesteps(self, scheduler, num_inference_steps: int, device: torch.device, height: int,
                      width: int) -> None:
        # As FluxPipeline: linear sigmas, shifted by ``mu``, which grows with the image's token count.
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        f = self.vae_scale_factor
        tokens = (height // f // 2) * (width // f // 2)
        mu = calculate_shift(tokens, scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def encode(self, prompts: list[str]) -> Cond:
        # diffusers' own encoding: T5's token states and CLIP-L's pooled embedding.
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.device, num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.pipe.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), self.distilled_guidance, device=self.device,
                                          dtype=torch.float32)
        return cond

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        pipe = self.pipe
        batch, channels, h, w = model_input.shape
        f = self.vae_scale_factor
        packed = pipe._pack_latents(model_input, batch, channels, h, w)
        image_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, model_input.device, model_input.dtype)
        embeds = cond["encoder_hidden_states"]
        text_dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
        text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=text_dtype)
        timestep = t.expand(batch).to(model_input.dtype)
        out = pipe.transformer(hidden_states=packed, timestep=timestep / 1000, guidance=cond.get("guidance"),
                               pooled_projections=cond["pooled_projections"], encoder_hidden_states=embeds,
                               txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return pipe._unpack_latents(out, h * f, w * f, f)
