"""TraSCE's maths as small pure functions over tensors: no model, no scheduler.

Conventions, used throughout the package. A *prediction* is whatever the denoiser outputs at one
step, batched as ``(B, C, H, W)`` (or ``(B, N, D)`` for transformer latents): noise for epsilon
models, velocity for v-prediction and flow-matching models. The three branches of a step are the
predictions under the empty prompt (``pred_0``), the user prompt (``pred_p``) and the concept to
erase (``pred_c``); ``scale`` is the classifier-free guidance scale, a float or a ``(B,)`` tensor
holding each image's own scale.

Every combination below is linear in the predictions, so it means the same thing whichever of
noise, velocity or data the model predicts.

Released-script names, documented once: ``loss_scale`` is its ``guidance_loss_scale`` (lambda),
``step_size`` is its ``discriminator_guidance_scale`` (eta; no discriminator exists) and ``sigma``
is its ``sigma``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Kernel = Literal["exp", "gaussian"]


def _per_image(scale: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """Broadcast a per-image ``(B,)`` tensor against ``like``'s trailing dimensions."""
    if isinstance(scale, torch.Tensor):
        return scale.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return scale


def cfg(pred_0: torch.Tensor, pred_p: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Plain classifier-free guidance: ``pred_0 + s * (pred_p - pred_0)``."""
    return pred_0 + _per_image(scale, pred_p) * (pred_p - pred_0)


def guidance_off_at_or_below_one(guided: torch.Tensor, pred_p: torch.Tensor,
                                 scale: float | torch.Tensor) -> torch.Tensor:
    """``guided`` ``(B, ...)`` for images whose ``scale`` is above 1, ``pred_p`` for the others.

    diffusers' pipelines switch guidance off at a scale of 1 or less and take the prompt's
    prediction alone: the same as CFG at 1, not below it.
    """
    if isinstance(scale, torch.Tensor):
        return torch.where(_per_image(scale, pred_p) > 1, guided, pred_p)
    return guided if scale > 1 else pred_p


def negative_prompt(pred_c: torch.Tensor, pred_p: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Conventional negative prompting (diffusers' ``negative_prompt=``): ``pred_c + s * (pred_p - pred_c)``.

    Its corner case: a prompt that predicts like the concept gives ``pred_p``, i.e. the concept
    generated with guidance merely switched off.
    """
    return cfg(pred_c, pred_p, scale)


def modified_negation(
    pred_0: torch.Tensor, pred_p: torch.Tensor, pred_c: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """TraSCE part 1: ``pred_0 + s * (pred_p - pred_c)``.

    A prompt that predicts like the concept collapses to ``pred_0``: unconditional generation.
    """
    return pred_0 + _per_image(scale, pred_p) * (pred_p - pred_c)


def distance(pred_p: torch.Tensor, pred_c: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm ``||pred_p - pred_c||`` over everything but the batch dimension, ``(B,)``.

    Computed in float32 whatever the model's dtype: a half-precision sum of 16k squares loses
    the small distances where the kernel matters most.
    """
    diff = (pred_p.float() - pred_c.float()).flatten(1)
    return diff.norm(dim=1)


def kernel(d: torch.Tensor, sigma: float, kind: Kernel = "exp") -> torch.Tensor:
    """Localisation kernel in ``[0, 1]``: ``exp(-d / sigma)`` as released, or the paper's Gaussian.

    ``"gaussian"`` is ``exp(-d**2 / (2 sigma**2))`` (the paper's Algorithm 1); the published
    settings belong to ``"exp"``, the released code's kernel.
    """
    if not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    if kind == "exp":
        return torch.exp(-d / sigma)
    if kind == "gaussian":
        return torch.exp(-(d**2) / (2 * sigma**2))
    raise ValueError(f"unknown kernel {kind!r}; expected 'exp' or 'gaussian'")


def steering_loss(d: torch.Tensor, loss_scale: float, sigma: float, kind: Kernel = "exp") -> torch.Tensor:
    """TraSCE part 2's per-image loss ``L = -loss_scale * kernel(d)``, shape ``(B,)``.

    Gradient *descent* on ``L`` decreases ``d``: near the concept the latent moves to where the
    prompt and concept predictions agree, so part 1's guidance term vanishes there (this is what
    the released code does, whatever some descriptions say about pushing away).
    """
    return -loss_scale * kernel(d, sigma, kind)


def steer(latents: torch.Tensor, grad: torch.Tensor, step_size: float | torch.Tensor) -> torch.Tensor:
    """The steering step ``x' = x - step_size * dL/dx`` (a per-image ``(B,)`` step size is allowed)."""
    return latents - _per_image(step_size, latents) * grad.to(latents.dtype)


def loss_slope(d: torch.Tensor, loss_scale: float, sigma: float, kind: Kernel = "exp") -> torch.Tensor:
    """``dL/dd`` of :func:`steering_loss`, per image ``(B,)``; ``dL/dx = dL/dd * dd/dx``.

    ``loss_scale * kernel(d) / sigma`` for ``exp`` and ``loss_scale * kernel(d) * d / sigma**2``
    for ``gaussian`` (both non-negative: L grows with d).
    """
    k = kernel(d, sigma, kind)
    return loss_scale * (k / sigma if kind == "exp" else k * d / sigma**2)


def update_bound(d: torch.Tensor, loss_scale: float, step_size: float, sigma: float, grad_d_norm: torch.Tensor,
                 kind: Kernel = "exp") -> torch.Tensor:
    """Size of the steering update ``||step_size * dL/dx||`` from ``d`` and ``||dd/dx||``, ``(B,)``.

    By the chain rule it is ``|step_size * dL/dd| * ||dd/dx||``; given an upper bound on
    ``||dd/dx||`` this bounds the update before any backward pass is paid for. (A negative
    ``loss_scale`` or ``step_size`` reverses the update, not its size.)
    """
    return (step_size * loss_slope(d, loss_scale, sigma, kind)).abs() * grad_d_norm
