"""A literal transcription of the released TraSCE sampling loop, kept as the reference.

It is deliberately the released shape: one image, one batched UNet call on ``[x, x, x]`` with
gradients on for all three branches, a global L2 norm, the ``exp`` kernel, and the update order
of TRASCE.md. The tests hold ``trasce.sampler`` to it, and ``trasce bench`` times it as "the
released loop". Do not optimise it.
"""

from __future__ import annotations

import torch


def released_loop(unet, scheduler, latents: torch.Tensor, uncond_embeddings: torch.Tensor,
                  text_embeddings: torch.Tensor, negative_embeddings: torch.Tensor, num_inference_steps: int,
                  guidance_scale: float, guidance_loss_scale: float, discriminator_guidance_scale: float,
                  sigma: float) -> torch.Tensor:
    """Final latents ``(1, C, h, w)`` from initial noise ``latents``, as the released script computes them.

    Argument names are the released script's. ``guidance_loss_scale = 0`` is part 1 alone.
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    embeddings = torch.cat([uncond_embeddings, text_embeddings, negative_embeddings])
    for t in scheduler.timesteps:
        latents = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 3), t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=embeddings).sample
            noise_pred_uncond, noise_pred_text, noise_pred_negative = noise_pred.chunk(3)
            loss = -guidance_loss_scale * torch.exp(
                -torch.norm(noise_pred_text - noise_pred_negative, p=2) / sigma)
            grad = torch.autograd.grad(loss, latents, allow_unused=True)[0]
        if grad is None:
            grad = torch.zeros_like(latents)
        latents = latents.detach() - discriminator_guidance_scale * grad
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_negative)
        latents = scheduler.step(noise_pred.detach(), t, latents).prev_sample
    return latents.detach()
