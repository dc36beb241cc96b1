"""Pipelines with random weights, built from architecture configs: for timing and for tests.

Timing does not depend on the weights, so ``trasce bench --arch sd14`` measures Stable Diffusion
v1.4's real cost without its checkpoint. ``tiny-*`` architectures are seconds-fast stand-ins for
tests. The tokenizer is a character-level CLIP tokenizer (CLIP's byte alphabet, no merges): it
produces valid ids for any text, which is all a random text encoder needs.
"""

from __future__ import annotations

import torch


def char_clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer over single characters; ids stay below 520, any CLIP vocab holds them."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, projection: int | None = None,
               vocab_size: int = 49408, max_positions: int = 77, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
                            hidden_act=act, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD14_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))
SD21_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), use_linear_projection=True)

# SD v1.4's topology (the same blocks, layers and heads, so the same operator calls per step) with
# narrow layers (the UNet at a tenth of its widths): benchmarks/op_count.py counts SD v1.4's calls
# with it in seconds.
SD14_NARROW_UNET = dict(SD14_UNET, cross_attention_dim=96, block_out_channels=(32, 64, 128, 128))
SD_VAE_NARROW = dict(SD_VAE, block_out_channels=(32, 64, 128, 128))

ARCHITECTURES = ("sd14", "sd14-narrow", "sd21", "tiny-sd", "sdxl", "tiny-sdxl", "sd3", "tiny-sd3", "flux", "tiny-flux")


def build_sd(arch: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A ``StableDiffusionPipeline`` of architecture ``arch`` (see ``ARCHITECTURES``) with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    if arch == "sd14":
        unet_config, text, prediction = SD14_UNET, dict(hidden=768, layers=12, heads=12, intermediate=3072), "epsilon"
        vae_config = SD_VAE
    elif arch == "sd14-narrow":
        unet_config, text, prediction = SD14_NARROW_UNET, dict(hidden=96, layers=12, heads=12, intermediate=384), \
            "epsilon"
        vae_config = SD_VAE_NARROW
    elif arch == "sd21":
        unet_config, text, prediction = SD21_UNET, dict(hidden=1024, layers=23, heads=16, intermediate=4096,
                                                         act="gelu"), "v_prediction"
        vae_config = SD_VAE
    elif arch == "tiny-sd":
        unet_config = dict(sample_size=8, cross_attention_dim=16, attention_head_dim=4, layers_per_block=1,
                           block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
        text, prediction = dict(hidden=16, layers=2, heads=2, intermediate=32, vocab_size=1000), "epsilon"
        vae_config = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")

    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_config)
        text_encoder = _clip_text(**text)
        vae = AutoencoderKL(in_channels=3, out_channels=3, **vae_config)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=char_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


# -- SDXL, SD3, FLUX ---------------------------------------------------------------------------
# The tokenizers are the character-level CLIP tokenizer above, for T5 as well: a random encoder
# needs valid ids, not a real vocabulary, and the padded lengths (77 CLIP, 256/512 T5 tokens) are
# the real ones, so timing is faithful. Real-size models are built one at a time and cast
# straight away, so that FLUX's 12B-parameter transformer never sits in memory in fp32 next to T5.

def _t5_encoder(d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, vocab_size: int = 32128,
                buckets: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_layers=layers,
                                   num_heads=heads, relative_attention_num_buckets=buckets,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))


def _built(make, dtype: torch.dtype, device: str | torch.device):
    """``make()`` built on ``device`` and cast to ``dtype`` before the next model is built."""
    with torch.device(device):
        module = make()
    # (diffusers warns on any dtype cast, even to the dtype a model already has)
    return (module if next(module.parameters()).dtype == dtype else module.to(dtype=dtype)).eval()


# SD's VAE blocks; SDXL keeps 4 latent channels, SD3 and FLUX have 16.
VAE_BLOCKS = {key: value for key, value in SD_VAE.items() if key != "latent_channels"}
CLIP_L = dict(hidden=768, layers=12, heads=12, intermediate=3072)
CLIP_G = dict(hidden=1280, layers=32, heads=20, intermediate=5120, act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64)
# Tiny encoders use the char tokenizer's own vocabulary, so that CLIP finds its end token and the
# pooled embedding differs between prompts.
_TINY_VOCAB = 2 * 256 + 2
TINY_CLIP = dict(hidden=16, layers=2, heads=2, intermediate=32, vocab_size=_TINY_VOCAB)
TINY_T5 = dict(d_model=32, d_ff=37, layers=2, heads=4, d_kv=8, vocab_size=_TINY_VOCAB, buckets=8)
# 4 blocks of 8 channels: 1/8 resolution like the real VAEs, at almost no cost.
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True)
TINY_SDXL_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                      attention_head_dim=(2, 4), cross_attention_dim=32, addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                      use_linear_projection=True, norm_num_groups=8)


def build_sdxl(arch: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A ``StableDiffusionXLPipeline`` (``sdxl``: the base model's architecture; ``tiny-sdxl``)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    if arch == "sdxl":
        unet_config, text, text_2, vae_config = SDXL_UNET, CLIP_L, dict(CLIP_G, projection=1280), VAE_BLOCKS
    elif arch == "tiny-sdxl":
        unet_config, text, text_2, vae_config = TINY_SDXL_UNET, TINY_CLIP, dict(TINY_CLIP, projection=16), TINY_VAE
    else:
        raise ValueError(f"unknown SDXL architecture {arch!r}; expected 'sdxl' or 'tiny-sdxl'")
    unet = _built(lambda: UNet2DConditionModel(in_channels=4, out_channels=4, **unet_config), dtype, device)
    text_encoder = _built(lambda: _clip_text(**text), dtype, device)
    text_encoder_2 = _built(lambda: _clip_text(**text_2), dtype, device)
    vae = _built(lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.13025,
                                       force_upcast=True, **vae_config), dtype, device)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=char_clip_tokenizer(), tokenizer_2=char_clip_tokenizer(), unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
TINY_SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                            caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)


def build_sd3(arch: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A ``StableDiffusion3Pipeline`` (``sd3``: SD3-medium's architecture; ``tiny-sd3``)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if arch == "sd3":
        transformer_config, vae_config = SD3_TRANSFORMER, VAE_BLOCKS
        text, text_2, text_3 = dict(CLIP_L, projection=768), dict(CLIP_G, projection=1280), T5_XXL
    elif arch == "tiny-sd3":
        transformer_config, vae_config = TINY_SD3_TRANSFORMER, TINY_VAE
        text, text_2, text_3 = dict(TINY_CLIP, projection=16), dict(TINY_CLIP, projection=16), TINY_T5
    else:
        raise ValueError(f"unknown SD3 architecture {arch!r}; expected 'sd3' or 'tiny-sd3'")
    transformer = _built(lambda: SD3Transformer2DModel(**transformer_config), dtype, device)
    text_encoder = _built(lambda: _clip_text(**text), dtype, device)
    text_encoder_2 = _built(lambda: _clip_text(**text_2), dtype, device)
    text_encoder_3 = _built(lambda: _t5_encoder(**text_3), dtype, device)
    vae = _built(lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, scaling_factor=1.5305,
                                       shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                                       **vae_config), dtype, device)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=char_clip_tokenizer(),
                                    text_encoder_2=text_encoder_2, tokenizer_2=char_clip_tokenizer(),
                                    text_encoder_3=text_encoder_3, tokenizer_3=char_clip_tokenizer(512))
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build_flux(arch: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A ``FluxPipeline`` (``flux``: FLUX.1-dev's architecture, guidance-distilled; ``tiny-flux``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if arch == "flux":
        transformer_config, vae_config, text, text_2, latent = FLUX_TRANSFORMER, VAE_BLOCKS, CLIP_L, T5_XXL, 16
    elif arch == "tiny-flux":
        transformer_config, vae_config, text, text_2, latent = TINY_FLUX_TRANSFORMER, TINY_VAE, TINY_CLIP, TINY_T5, 4
    else:
        raise ValueError(f"unknown FLUX architecture {arch!r}; expected 'flux' or 'tiny-flux'")
    transformer = _built(lambda: FluxTransformer2DModel(**transformer_config), dtype, device)
    text_encoder = _built(lambda: _clip_text(**text), dtype, device)
    text_encoder_2 = _built(lambda: _t5_encoder(**text_2), dtype, device)
    vae = _built(lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, scaling_factor=0.3611,
                                       shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                                       **vae_config), dtype, device)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=char_clip_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=char_clip_tokenizer(512), transformer=transformer)
    if arch == "tiny-flux":
        pipe.default_sample_size = 8  # 64 px by default, not FLUX's 1024
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"sd14": build_sd, "sd14-narrow": build_sd, "sd21": build_sd, "tiny-sd": build_sd,
            "sdxl": build_sdxl, "tiny-sdxl": build_sdxl, "sd3": build_sd3, "tiny-sd3": build_sd3,
            "flux": build_flux, "tiny-flux": build_flux}


def build(arch: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random-weight pipeline of any registered architecture."""
    if arch not in BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(BUILDERS)}")
    return BUILDERS[arch](arch, dtype=dtype, device=device)
