"""Stable Diffusion XL (base): two CLIP text encoders, pooled embeddings and size/crop conditioning.

Cost per step: plain CFG is 2 UNet passes (one batched call); TraSCE is 3 (one batched call, of
which the prompt and concept branches carry gradients, plus one backward pass through them).

The unconditional branch is what diffusers uses for ``negative_prompt=None``: zeros, for both the
sequence and the pooled embedding, when the pipeline's ``force_zeros_for_empty_prompt`` is set (as
in the SDXL base checkpoint), else the empty prompt's embeddings. The concept branch is always the
concept's own embeddings, as diffusers' ``negative_prompt=concept`` is.

The published sigmas are for SD v1.4's 4 x 64 x 64 latent; at 1024 x 1024 SDXL's latent holds 4x
as many numbers, so its distances run about 2x larger: start from 2x sigma (see ``trasce.models.sd3``).

SDXL-Turbo and LCM-distilled SDXL UNets are meant to run without classifier-free guidance (CFG 1):
their unconditional and concept branches carry no guidance signal, so TraSCE cannot steer them.
The refiner (``StableDiffusionXLImg2ImgPipeline``, aesthetic-score conditioning) is not supported.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from trasce.models.base import Adapter
from trasce.sampler import Cond

_upcast_lock = threading.Lock()  # see StableDiffusionXLAdapter.decode


class StableDiffusionXLAdapter(Adapter):
    """``StableDiffusionXLPipeline``: CLIP-L + CLIP-G (with projection), a ``text_time`` UNet.

    ``original_size``/``target_size`` (``None``: the generated size) and ``crops_coords_top_left``
    are SDXL's micro-conditioning, with diffusers' defaults; the same for all three branches.
    """

    pipeline_classes = ("StableDiffusionXLPipeline",)
    family = "Stable Diffusion XL"

    options = ("original_size", "target_size", "crops_coords_top_left")

    def __init__(self, pipe):
        super().__init__(pipe)
        self.original_size: tuple[int, int] | None = None
        self.target_size: tuple[int, int] | None = None
        self.crops_coords_top_left: tuple[int, int] = (0, 0)

    def encode(self, prompts: list[str]) -> Cond:
        # diffusers' own encoding: penultimate hidden states of both encoders, concatenated, and
        # the second encoder's pooled projection.
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def encode_unconditional(self, batch: int) -> Cond:
        cond = self.encode([""] * batch)
        if self.pipe.config.force_zeros_for_empty_prompt:
            # SDXL was trained with dropped captions as zero embeddings; diffusers uses them for
            # ``negative_prompt=None``.
            cond = {key: torch.zeros_like(value) for key, value in cond.items()}
        return cond

    def time_ids(self, height: int, width: int, pooled_dim: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """``add_time_ids`` ``(B, 6)`` for images of ``height`` x ``width`` pixels, via diffusers."""
        encoder_2 = self.pipe.text_encoder_2
        pooled_dim = encoder_2.config.projection_dim if encoder_2 is not None else pooled_dim
        ids = self.pipe._get_add_time_ids(self.original_size or (height, width), self.crops_coords_top_left,
                                          self.target_size or (height, width), dtype=dtype,
                                          text_encoder_projection_dim=pooled_dim)
        return ids.to(self.device).repeat(batch, 1)

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # The time ids depend only on the image size, which the latent's grid gives back.
        f = self.vae_scale_factor
        embeds, pooled = cond["encoder_hidden_states"], cond["text_embeds"]
        time_ids = self.time_ids(model_input.shape[-2] * f, model_input.shape[-1] * f, pooled.shape[-1],
                                 model_input.shape[0], embeds.dtype)
        return self.pipe.unet(model_input, t, encoder_hidden_states=embeds,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, output_type: str) -> tuple[object, list[bool] | None]:
        """As diffusers' SDXL: fp16 VAEs that overflow are upcast; ``latents_mean``/``std`` undone."""
        vae = self.pipe.vae
        # Threads sharing a VAE that is upcast take turns: one would find it in float32 and decode without
        # upcasting while the other cast it back to float16 under it.
        with _upcast_lock if vae.config.force_upcast else contextlib.nullcontext():
            images = self._decode(vae, latents)
        if getattr(self.pipe, "watermark", None) is not None:
            images = self.pipe.watermark.apply_watermark(images)
        return self.postprocess(images.detach(), output_type)

    def _decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's decoding of ``latents``, upcast to float32 for its duration where the VAE asks for it."""
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(vae.device, vae.dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:  # back to fp16 even when decoding fails (out of memory), as the user loaded it
                vae.to(dtype=torch.float16)
