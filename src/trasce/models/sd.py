"""Stable Diffusion 1.x and 2.x (epsilon and v-prediction), and the embedded pixel-space model."""

from __future__ import annotations

import torch

from trasce.models.base import Adapter
from trasce.sampler import Cond


class StableDiffusionAdapter(Adapter):
    """``StableDiffusionPipeline`` and its subclasses: one CLIP text encoder, a ``UNet2DConditionModel``."""

    pipeline_classes = ("StableDiffusionPipeline",)
    family = "Stable Diffusion 1.x/2.x"

    def encode(self, prompts: list[str]) -> Cond:
        # diffusers' own prompt encoding (textual inversion, LoRA scale), so that the embeddings
        # are exactly the ones the user's pipeline would compute.
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.pipe.unet(model_input, t, encoder_hidden_states=cond["encoder_hidden_states"],
                              return_dict=False)[0]
