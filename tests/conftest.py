"""Tiny random diffusers models built from configs: every code path, no network, seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from trasce.models.random import char_clip_tokenizer


def make_tiny_sd(tmp_path, prediction_type: str = "epsilon", vae: bool = True, sample_size: int = 8, seed: int = 0):
    """A ``StableDiffusionPipeline`` with random weights: 4x8x8 latents (64 px) or a pixel model."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(model_max_length=24)
    vocab_size = len(tokenizer)
    channels = 4 if vae else 3
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
    ))
    autoencoder = None
    if vae:
        autoencoder = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    # Random weights give tiny, nearly identical predictions; a larger output scale makes the
    # branches differ the way a trained model's do, so guidance and steering are measurable.
    with torch.no_grad():
        unet.conv_out.weight.mul_(4)
    pipe = StableDiffusionPipeline(vae=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_safety_checker(pipe, flags_every_image: bool):
    """``pipe`` with a tiny random safety checker that flags every image, or none.

    The checker flags an image when a cosine similarity (in [-1, 1]) exceeds a concept's weight:
    weights of -2 flag every image, +2 none. (``flag_by_position`` makes it flag chosen images.)
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tiny, projection_dim=8,
                                                      vision_config=dict(**tiny, image_size=32, patch_size=8))).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flags_every_image else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    safe = StableDiffusionPipeline(**{**pipe.components, "safety_checker": checker, "feature_extractor": extractor})
    safe.set_progress_bar_config(disable=True)
    return safe


def flag_by_position(pipe, flagged_at) -> None:
    """Make ``pipe``'s safety checker flag the images at the positions ``i`` where ``flagged_at(i)``
    holds, blacking them out as diffusers' checker does."""
    checker = pipe.safety_checker

    def forward(clip_input, images):
        flags = [bool(flagged_at(i)) for i in range(len(images))]
        for i, flag in enumerate(flags):
            if flag:
                images[i] = torch.zeros_like(images[i]) if torch.is_tensor(images[i]) else images[i] * 0
        return images, flags

    checker.forward = forward


@pytest.fixture
def tiny_sd(tmp_path):
    return make_tiny_sd(tmp_path)


@pytest.fixture
def tiny_sd_folder(tmp_path):
    """A tiny SD pipeline saved as a diffusers folder."""
    pipe = make_tiny_sd(tmp_path)
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    return folder
