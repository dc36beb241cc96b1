"""The denoising loop, with TraSCE's steering, for any diffusers scheduler and any model family.

The loop knows schedulers, not models: a model family is reached through a *denoiser*, a callable
``denoise(model_input, t, cond) -> prediction`` (see ``trasce.models``), and a *conditioning* is a
dict of tensors whose first dimension is the batch, so that branches concatenate and images can
be picked out without knowing what the tensors mean.

One step in ``trasce`` mode, in the released order (see ``../shared/TRASCE.md``):

1. predictions of the three branches at ``x_t`` (gradients on for the prompt and concept branches);
2. ``d = ||pred_p - pred_c||`` per image, ``L = -loss_scale * exp(-d / sigma)``,
   ``x_t' = x_t - step_size * dL/dx_t``;
3. the guided prediction from step 1's outputs (taken at the *old* ``x_t``);
4. ``x_{t-1} = scheduler.step(guided, t, x_t')``: the scheduler steps from the *steered* latent.

``sample`` is a generator that yields a :class:`Step` after every denoising step, which makes
progress bars, previews and tests simple; the last yielded latents are the result.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from trasce import guidance
from trasce.guidance import Kernel

Mode = Literal["trasce", "negation", "steering", "negative_prompt", "none"]
MODES: tuple[str, ...] = ("trasce", "negation", "steering", "negative_prompt", "none")
STEERING_MODES: tuple[str, ...] = ("trasce", "steering")  # the modes with part 2: backward passes
Cond = dict[str, torch.Tensor]
#: Default lazy-steering tolerance: the RMS per latent element of a steering update worth a backward
#: pass. Measured on the embedded model (benchmarks/lazy_accuracy.py, docs/speed.md).
DEFAULT_LAZY_TOLERANCE = 1e-4
Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
#: The most latent numbers a step's steered images may hold for ``one_call=None`` to evaluate them in
#: one call on CUDA: four SD v1.4 latents at 512 px (4x64x64 each). On an H200 (docs/speed.md), four
#: such images took 14-26 % less time in one call than in two, sixteen 17 % more: there the GPU's
#: arithmetic, not its kernel launches, sets the pace. On a CPU one call never paid.
ONE_CALL_MAX_ELEMENTS = 4 * 4 * 64 * 64


def is_number(value) -> bool:
    """A real number, not a bool or a text (``"1"`` compares with no number)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_count(value) -> bool:
    """A whole number of at least 1, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class EraseSettings:
    """How a concept is erased. ``loss_scale``/``step_size``/``sigma`` are lambda/eta/sigma.

    ``lazy_tolerance``: skip an image's backward pass at a step when the steering update it would
    get is estimated below this size, measured as the update's root mean square per latent element
    (so one number means the same for a 3x32x32 and a 16x128x128 latent); ``None`` is exact.
    ``steer_window``: the fraction of steps ``(start, end)`` in which steering applies: step ``i``
    of ``n`` steers when ``start * n <= i < end * n``.
    ``one_call``: evaluate a steered image's three branches in one denoiser call under gradients
    instead of two calls (the empty prompt without gradients, prompt and concept with). The same
    numbers; one call's kernel launches fewer, but the backward pass also runs through the empty
    prompt's rows. It pays where launching kernels, not running them, limits a GPU; ``None`` (the
    default) chooses at each step (see :meth:`uses_one_call`).
    """

    mode: Mode = "trasce"
    loss_scale: float = 1.0
    step_size: float = 1.0
    sigma: float = 1.0
    kernel: Kernel = "exp"
    lazy_tolerance: float | None = DEFAULT_LAZY_TOLERANCE
    steer_window: tuple[float, float] = (0.0, 1.0)
    one_call: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name in ("loss_scale", "step_size", "sigma"):
            if not is_number(getattr(self, name)):
                raise TypeError(f"{name} must be a number, got {type(getattr(self, name)).__name__} "
                                f"{getattr(self, name)!r}")
        if not 0 < self.sigma < math.inf:
            raise ValueError(f"sigma must be a positive finite number, got {self.sigma}")
        for name in ("loss_scale", "step_size"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.kernel not in ("exp", "gaussian"):
            raise ValueError(f"unknown kernel {self.kernel!r}; expected 'exp' or 'gaussian'")
        if self.lazy_tolerance is not None and (not is_number(self.lazy_tolerance) or not self.lazy_tolerance >= 0):
            raise ValueError(f"lazy_tolerance must be a number of at least 0 (or None: exact), got "
                             f"{self.lazy_tolerance!r}")
        window = self.steer_window
        if (not isinstance(window, (tuple, list)) or len(window) != 2 or not all(map(is_number, window))
                or not 0 <= window[0] <= window[1] <= 1):
            shown = tuple(window) if isinstance(window, (tuple, list)) else window
            raise ValueError(f"steer_window must be (start, end) with 0 <= start <= end <= 1, fractions of the "
                             f"steps ((0, 1) steers at every step); got {shown!r}")
        if not (self.one_call is None or isinstance(self.one_call, bool)):
            raise ValueError(f"one_call must be True, False or None (chosen at each step), got {self.one_call!r}")

    def window_steps(self, n: int) -> tuple[int, int]:
        """The steps ``first <= i < last`` of ``n`` that ``steer_window`` holds.

        ``start * n`` is rounded to 9 decimals first: 0.14 * 50 is 7.000000000000001 in floating
        point, and step 7 belongs to the window that starts at 0.14.
        """
        return tuple(math.ceil(round(fraction * n, 9)) for fraction in self.steer_window)

    def uses_one_call(self, device: torch.device | str, elements: int, cuda_graphs: bool = False) -> bool:
        """Whether steered images whose latents hold ``elements`` numbers in all take one denoiser call
        on ``device``: ``one_call``, or by default one call on CUDA while ``elements`` is at most
        ``ONE_CALL_MAX_ELEMENTS``, where kernel launches rather than the kernels limit the GPU, unless
        the denoiser replays ``cuda_graphs``, which launch a graph's kernels at no cost: there two calls,
        less arithmetic, were faster (an H200, four SD v1.4 latents: 1.27 s per image against 1.38).
        """
        if self.one_call is not None:
            return self.one_call
        return torch.device(device).type == "cuda" and not cuda_graphs and elements <= ONE_CALL_MAX_ELEMENTS

    @property
    def steers(self) -> bool:
        """Whether part 2 (the latent update) is on at all."""
        return self.mode in STEERING_MODES and self.loss_scale != 0 and self.step_size != 0

    @property
    def branches(self) -> tuple[str, ...]:
        """Which of the empty (``0``), prompt (``p``) and concept (``c``) branches the mode needs."""
        return {"none": ("0", "p"), "negative_prompt": ("c", "p")}.get(self.mode, ("0", "p", "c"))


@dataclass
class Step:
    """State after one denoising step; tensors are per image, ``(B,)`` unless said otherwise."""

    index: int
    timestep: torch.Tensor
    latents: torch.Tensor  # (B, ...) x_{t-1}
    distance: torch.Tensor | None = None  # d at x_t, in noise units, float32
    kernel: torch.Tensor | None = None  # kernel(d)
    steered: torch.Tensor | None = None  # bool: the backward pass ran for this image


def cat_cond(*conds: Cond) -> Cond:
    """Concatenate conditionings along the batch (the branch order is the argument order)."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def take_cond(cond: Cond, index: torch.Tensor) -> Cond:
    """The images ``index`` (a 1-D long tensor) of a conditioning."""
    return {key: value[index.to(value.device)] for key, value in cond.items()}


def noise_scale(scheduler, t: torch.Tensor) -> float:
    """Factor that turns a difference of two predictions into a difference of noise predictions.

    TraSCE's ``d`` is defined on noise predictions. For v-prediction, ``eps = sqrt(a) * v +
    sqrt(1 - a) * x_t`` (``a`` = alpha-bar at t); both branches share ``x_t``, so ``eps_p - eps_c =
    sqrt(a) * (v_p - v_c)`` and the distance is the velocity distance times ``sqrt(a)``. Epsilon
    models need no factor; flow-matching models (no ``prediction_type``) use the velocity as is.
    """
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction_type == "v_prediction":
        c = input_scale(scheduler, t)
        if c != 1.0:  # Euler, LMS: c = sqrt(sigma**2 + 1) = 1 / sqrt(a), exact where t is fractional (Karras)
            return 1.0 / c
        return float(scheduler.alphas_cumprod[int(t)].sqrt())
    if prediction_type in ("epsilon", "flow_prediction", None):
        return 1.0
    raise ValueError(
        f"TraSCE needs a noise, velocity or flow prediction; this scheduler predicts {prediction_type!r}"
    )


def scale_model_input(scheduler, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scheduler.scale_model_input``, or ``sample`` unchanged for schedulers without one.

    Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``: SD3, FLUX) have no such method:
    their models take the latent as it is, which is what diffusers' flow pipelines feed them.
    """
    scale = getattr(scheduler, "scale_model_input", None)
    return sample if scale is None else scale(sample, t)


def input_scale(scheduler, t: torch.Tensor) -> float:
    """``c`` such that the denoiser sees ``x / c`` for the scheduler's sample ``x`` at ``t``.

    1 for DDIM, DDPM, DPM-Solver and flow matching; ``sqrt(sigma**2 + 1)`` for Euler and LMS,
    whose samples carry the noise level's scale. TraSCE's update belongs to the latent the denoiser
    sees (the released loop's DDIM latent), so the sampler steers in that space: on ``x`` the
    update is ``c**2`` times the gradient step with respect to ``x`` (see ``_steering_step``).
    """
    return 1.0 / float(scale_model_input(scheduler, torch.ones(()), t))


def _step_kwargs(scheduler, generator) -> dict:
    """Optional arguments of ``scheduler.step`` that diffusers' pipelines pass (eta, generator)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


#: diffusers schedulers whose ``step`` continues from the latent it is given. Others continue some
#: steps from a sample they stored at an earlier step, which drops TraSCE's update to the latent:
#: PNDM (SD v1.x's default: its Runge-Kutta steps and its second multistep step), UniPC (its
#: corrector), Heun, KDPM2 and single-step DPM-Solver (their second stages).
STEERABLE_SCHEDULERS = frozenset({
    "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
})


def discards_steering(scheduler) -> bool:
    """Whether ``scheduler`` is not known to step from the latent it is given (``STEERABLE_SCHEDULERS``)."""
    return type(scheduler).__name__ not in STEERABLE_SCHEDULERS


def check_scheduler(scheduler, settings: EraseSettings, steps: int) -> None:
    """``ValueError`` when ``settings`` steer in some of the ``steps`` and ``scheduler`` would drop the update."""
    first, last = settings.window_steps(steps)
    if settings.steers and first < last and discards_steering(scheduler):
        raise ValueError(
            f"{type(scheduler).__name__} is not among the schedulers known to step from the latent they are given "
            f"({', '.join(sorted(STEERABLE_SCHEDULERS))}); others, like PNDM (SD v1.x's default) and UniPC, "
            "continue some steps from a sample stored earlier, which drops TraSCE's steering update. Use DDIM, "
            "the published setting (--scheduler ddim, or pipe.scheduler = "
            "DDIMScheduler.from_config(pipe.scheduler.config))")


class CompiledGradientError(RuntimeError):
    """A compiled denoiser's backward pass disagrees with the uncompiled denoiser's."""


class GradientCheck:
    """Holds a compiled denoiser's backward pass to the uncompiled denoiser's, once per input shape.

    Compilers have shipped backward passes that are silently wrong while their forward passes are
    right: on CPU, torch 2.13's inductor zeroes the input gradient through a small diffusers UNet's
    up block in fp32, and shrinks the embedded model's 20-40 fold in bf16 and fp16. TraSCE steers
    with exactly such an input gradient, so before the first steering call of each input shape,
    the same rows and conditioning go through the compiled and the uncompiled denoiser, and the
    two vector-Jacobian products with one fixed random vector must agree. A random product rounds
    like one backward pass (on the embedded model, bf16 against fp32: at most 0.8 %; fp16: 0.1 %),
    whereas the steering gradient itself is the difference of two branches' products and cancels
    near the concept (bf16 rounding alone moves it by up to 79 % for one image).
    ``reference`` is the uncompiled denoiser; the check costs two forward and backward passes of
    the steering call's rows per new shape.
    """

    #: largest relative L2 difference accepted
    tolerance = 0.05

    def __init__(self, reference: Denoiser):
        self.reference = reference
        self.verified: set[tuple] = set()

    def verify(self, denoise: Denoiser, x: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor],
               t: torch.Tensor, cond: Cond) -> None:
        """Check ``denoise(rows(x), t, cond)``'s gradient w.r.t. ``x`` unless its shape passed before."""
        key = (tuple(x.shape), x.dtype, str(x.device), tuple(len(v) for v in cond.values()))
        if key in self.verified:
            return
        grads, vector = [], None
        for fn in (denoise, self.reference):
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                out = fn(rows(leaf), t, cond).float()
                if vector is None:
                    vector = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
                (grad,) = torch.autograd.grad((out * vector).sum(), leaf)
            grads.append(grad.float())
        compiled, expected = grads
        if not torch.isfinite(expected).all():
            return  # the uncompiled pass overflowed: nothing to hold the compiled one to
        error = float((compiled - expected).norm() / expected.norm().clamp_min(1e-12))
        if not error <= self.tolerance:
            raise CompiledGradientError(
                f"the compiled denoiser's backward pass differs from the uncompiled denoiser's by {error:.0%} "
                f"(relative L2 of a random vector-Jacobian product over {len(x)} image(s) at timestep {int(t)}; "
                f"at most {self.tolerance:.0%} is accepted), so TraSCE will not steer with it: torch "
                f"{torch.__version__}'s compiler gets this backward pass wrong. Use the uncompiled denoiser, or "
                "another torch.compile backend or mode")
        self.verified.add(key)


class _GradientNormEstimate:
    """Per-image estimate of ``||dd/dx||``, the factor that ``update_bound`` needs (held free of the
    step's noise and input scales, see ``_steering_step``).

    It is an estimate, not a proof. An image's steered steps measure it exactly; a step that skips
    the backward pass takes the largest value measured so far, times ``margin``, times ``growth``
    for every step since the image was last measured. The growth term is there because the norm
    rises as noise is removed, faster than ``margin`` covers: on the embedded model, with the running
    maximum alone, the default tolerance skipped updates up to 2.6 times its size on concept-near
    captions; with ``growth`` 1.5 the largest skipped update was 0.36 of it
    (``benchmarks/lazy_skips.py``: each skipped step replayed on the exact path from the same
    latent; 18 captions, three seeds). docs/speed.md gives the final images' differences.
    """

    #: factor on the largest norm measured
    margin = 2.0
    #: factor for every step since the image was last measured (``benchmarks/lazy_skips.py`` measures others)
    growth = 1.5

    def __init__(self, batch: int, device: torch.device):
        self.value = torch.full((batch,), float("nan"), device=device)
        # Steered steps since each image was last measured (its estimate's age).
        self.age = torch.zeros(batch, device=device)
        # The update size estimated (or measured) at the previous step; NaN until known.
        self.last_bound = torch.full((batch,), float("nan"), device=device)
        # Known on the host without asking the GPU: every image was cold, and none surprised, at
        # the previous steering step, so every ``last_bound`` is below the tolerance.
        self.all_cold = False

    def next_step(self) -> None:
        """A steered step begins: every estimate is one step older."""
        self.age += 1

    def bound(self) -> torch.Tensor:
        # Held finite: growth**age overflows after about 200 cold steps, and an infinite bound times a
        # kernel slope that underflowed to 0 would be NaN, which counts as a surprise.
        return (self.value * self.margin * self.growth**self.age).clamp(max=torch.finfo(self.value.dtype).max)

    def update(self, index: torch.Tensor, measured: torch.Tensor) -> None:
        current = self.value[index]
        self.value[index] = torch.where(torch.isnan(current), measured, torch.maximum(current, measured))
        self.age[index] = 0


def sample(
    denoise: Denoiser,
    scheduler,
    latents: torch.Tensor,
    cond_0: Cond,
    cond_p: Cond,
    cond_c: Cond,
    guidance_scale: float | torch.Tensor,
    settings: EraseSettings,
    num_inference_steps: int = 50,
    generator: torch.Generator | list[torch.Generator] | None = None,
    timesteps_set: bool = False,
    gradient_check: GradientCheck | None = None,
    cuda_graphs: bool = False,
) -> Iterator[Step]:
    """Denoise ``latents`` ``(B, ...)`` (already scaled by ``init_noise_sigma``), yielding each step.

    ``cond_0``/``cond_p``/``cond_c`` hold B images each (the concept may differ per image);
    ``guidance_scale`` is a float or a ``(B,)`` tensor. With ``timesteps_set`` the caller already
    called ``scheduler.set_timesteps`` (diffusers' pipelines do this before preparing latents).
    ``gradient_check``, given when ``denoise`` is compiled, holds each new shape of the steering
    call to the uncompiled denoiser (:class:`CompiledGradientError` if they disagree). ``cuda_graphs``:
    ``denoise`` replays CUDA graphs (see :meth:`EraseSettings.uses_one_call`).
    """
    if not timesteps_set:
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    # The per-step factors read timesteps as numbers (int(t) for v-prediction's alpha-bar); read from a
    # GPU tensor, each would wait for the GPU's queue to drain, so they get a host copy, made once.
    host_timesteps = timesteps.cpu()
    first, last = settings.window_steps(len(timesteps))
    check_scheduler(scheduler, settings, len(timesteps))
    batch = latents.shape[0]
    scale = guidance_scale
    if isinstance(scale, torch.Tensor):
        scale = scale.to(latents.device, torch.float32)
    step_kwargs = _step_kwargs(scheduler, generator)
    estimate = _GradientNormEstimate(batch, latents.device)
    everyone = torch.arange(batch, device=latents.device)
    # The unsteered steps' branches and their conditioning, the same at every step.
    names = settings.branches
    all_cond = cat_cond(*({"0": cond_0, "p": cond_p, "c": cond_c}[b] for b in names))

    for i, t in enumerate(timesteps):
        steer_now = settings.steers and first <= i < last
        factor = noise_scale(scheduler, host_timesteps[i])
        scale_in = input_scale(scheduler, host_timesteps[i]) if steer_now else 1.0
        step = Step(index=i, timestep=t, latents=latents)

        if not steer_now:
            model_input = scale_model_input(scheduler, torch.cat([latents] * len(names)), t)
            with torch.no_grad():
                preds = dict(zip(names, denoise(model_input, t, all_cond).chunk(len(names)), strict=True))
            steered_latents = latents
            if "c" in preds:  # d and the kernel are defined wherever the concept branch is
                step.distance = guidance.distance(preds["p"], preds["c"]) * factor
                step.kernel = guidance.kernel(step.distance, settings.sigma, settings.kernel)
        else:
            preds, steered_latents, step = _steering_step(
                denoise, scheduler, latents, t, cond_0, cond_p, cond_c, settings, factor, scale_in, estimate,
                everyone, step, gradient_check, cuda_graphs,
            )
        if factor == 0:  # zero terminal SNR: both predictions are the noise itself, so d = 0 says nothing
            step.distance = step.kernel = None

        # In the latents' dtype: some schedulers (Euler, flow matching) return their step in the
        # prediction's dtype, which would put half-precision latents back.
        guided = _combine(settings.mode, preds, scale).to(steered_latents.dtype)
        latents = scheduler.step(guided, t, steered_latents, **step_kwargs, return_dict=False)[0]
        step.latents = latents
        yield step


def _combine(mode: str, preds: dict[str, torch.Tensor], scale) -> torch.Tensor:
    """The guided prediction of ``mode`` from the branch predictions, in fp32 (like the latents), so
    that a half-precision model's image does not depend on whether its batch shares one CFG scale."""
    preds = {branch: values.float() for branch, values in preds.items()}
    # The two modes that stand for diffusers' own pipelines do as they do at scales of 1 or less.
    if mode in ("none", "negative_prompt"):
        guided = (guidance.cfg(preds["0"], preds["p"], scale) if mode == "none"
                  else guidance.negative_prompt(preds["c"], preds["p"], scale))
        return guidance.guidance_off_at_or_below_one(guided, preds["p"], scale)
    if mode == "steering":
        return guidance.cfg(preds["0"], preds["p"], scale)
    return guidance.modified_negation(preds["0"], preds["p"], preds["c"], scale)


def _steering_step(denoise, scheduler, latents, t, cond_0, cond_p, cond_c, settings: EraseSettings,
                   factor: float, scale_in: float, estimate: _GradientNormEstimate, everyone: torch.Tensor,
                   step: Step, check: GradientCheck | None = None, cuda_graphs: bool = False):
    """One step with part 2: predictions, the steering update, and the bookkeeping in ``step``.

    ``factor`` is ``noise_scale`` (d in noise units) and ``scale_in`` is ``input_scale`` (the
    denoiser sees ``latents / scale_in``). The update is the released step ``-eta * dL/dx_in`` on
    the denoiser's input ``x_in``, i.e. ``-eta * scale_in**2 * dL/dx`` on ``latents``; update sizes
    (the lazy tolerance) are measured on ``x_in`` too, and the gradient-norm estimate holds
    ``||d(d / factor)/dx_in||``, free of both factors, which change from step to step.

    Exact (``lazy_tolerance is None``): every image gets its backward pass. Lazy: an image whose
    update was estimated below the tolerance at the previous step is first evaluated without
    gradients; if its update estimate is still below the tolerance, it skips the backward pass,
    else (a rare surprise) its prompt and concept branches are evaluated again with gradients.
    Images above the tolerance, or not yet measured, take the gradient path directly, so an image
    near the concept costs what it costs in the exact path. With one call (``one_call``, or its
    default's choice for the hot images) the gradient call also evaluates those images'
    empty-prompt branch, and the no-gradient call holds the cold images only.
    """
    batch = latents.shape[0]
    lazy = settings.lazy_tolerance is not None
    # Bounds are L2 norms over a whole latent; the tolerance is per element (RMS).
    tolerance = settings.lazy_tolerance * latents[0].numel() ** 0.5 if lazy else 0.0
    if lazy:
        estimate.next_step()
    if lazy and estimate.all_cold:  # a benign batch's usual step: no need to ask the GPU
        cold, hot = everyone, everyone[:0]
    elif lazy:
        cold_mask = estimate.last_bound < tolerance
        cold, hot = everyone[cold_mask], everyone[~cold_mask]
        # Masks keep the order, so a mask that holds every image gives ``everyone``: say so.
        cold, hot = (everyone if len(cold) == batch else cold), (everyone if len(hot) == batch else hot)
    else:  # no mask: indexing by one would make the CPU wait for the GPU
        cold, hot = everyone[:0], everyone
    # With one call the hot images' empty-prompt branch rides in the gradient call.
    one_call = settings.uses_one_call(latents.device, len(hot) * latents[0].numel(), cuda_graphs)
    hot0 = hot if one_call else hot[:0]
    zero_rows = cold if one_call else everyone
    preds: dict[str, torch.Tensor] = {}

    # ``everyone`` itself as the index (not merely every image: ``hot`` may be out of order) needs
    # no gather or scatter.
    def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values if index is everyone else values[index]

    def take_c(cond: Cond, index: torch.Tensor) -> Cond:
        return cond if index is everyone else take_cond(cond, index)

    def put(branch: str, index: torch.Tensor, values: torch.Tensor) -> None:
        if index is everyone:
            preds[branch] = values
            return
        if branch not in preds:
            preds[branch] = values.new_empty((batch, *values.shape[1:]))
        preds[branch][index] = values.to(preds[branch].dtype)

    d = torch.zeros(batch, device=latents.device)
    if len(zero_rows):
        with torch.no_grad():
            # Branch 0 for every image not in the gradient call, plus prompt and concept for the
            # cold images, in one call.
            x_cold = take(latents, cold)
            x_zero, cond_zero = (x_cold, take_c(cond_0, cold)) if one_call else (latents, cond_0)
            model_input = scale_model_input(scheduler, torch.cat([x_zero, x_cold, x_cold]), t)
            cond = cat_cond(cond_zero, take_c(cond_p, cold), take_c(cond_c, cold))
            p0, cold_p, cold_c = denoise(model_input, t, cond).split([len(zero_rows), len(cold), len(cold)])
            put("0", zero_rows, p0)
        if len(cold):
            put("p", cold, cold_p)
            put("c", cold, cold_c)
            cold_d = guidance.distance(cold_p, cold_c) * factor
            if cold is everyone:
                d = cold_d
            else:
                d[cold] = cold_d
            bound = guidance.update_bound(cold_d, settings.loss_scale, settings.step_size, settings.sigma,
                                          take(estimate.bound(), cold) * factor, settings.kernel)
            estimate.last_bound[cold] = bound
            # The one question a benign batch asks the GPU per step: did any image surprise?
            surprise = cold[~(bound < tolerance)]
            hot = torch.cat([hot, surprise])
    if lazy:
        estimate.all_cold = len(hot) == 0

    steered = latents  # without a backward pass the update is zero
    if len(hot):
        # The no-gradient call's outputs must outlive the gradient call, and a denoiser compiled with
        # CUDA graphs (--compile reduce-overhead or cudagraphs) reuses its output memory at its next call.
        preds = {branch: values.clone() for branch, values in preds.items()}
        # hot0 comes first in hot: surprises, whose branch 0 is known, were appended after it.
        def rows(x: torch.Tensor) -> torch.Tensor:
            return scale_model_input(scheduler, torch.cat([x[:len(hot0)], x, x]), t)

        cond = cat_cond(take_c(cond_0, hot0), take_c(cond_p, hot), take_c(cond_c, hot))
        if check is not None:
            check.verify(denoise, take(latents, hot), rows, t, cond)
        with torch.enable_grad():
            x = take(latents, hot).detach().requires_grad_(True)
            h0, hp, hc = denoise(rows(x), t, cond).split([len(hot0), len(hot), len(hot)])
            hot_d = guidance.distance(hp, hc) * factor
            # Each image's d depends on its own latent only, so the gradient of the sum gives every
            # image its own dd/dx in one backward pass. dL/dx = dL/dd * dd/dx (chain rule, the same
            # numbers as differentiating L): keeping dd/dx separate measures ||dd/dx|| even where
            # the kernel has underflowed to 0, which the lazy path's estimate needs.
            (grad_d,) = torch.autograd.grad(hot_d.sum(), x)
        hot_d = hot_d.detach()
        dL_dd = guidance.loss_slope(hot_d, settings.loss_scale, settings.sigma, settings.kernel)
        hot_grad = dL_dd.reshape(-1, *([1] * (x.ndim - 1))) * grad_d.float()
        if hot is everyone:
            grad = hot_grad
        else:
            grad = torch.zeros_like(latents)
            grad[hot] = hot_grad.to(grad.dtype)
        steered = guidance.steer(latents, grad, settings.step_size * scale_in**2)
        if len(hot0):
            put("0", hot0, h0.detach())
        put("p", hot, hp.detach())
        put("c", hot, hc.detach())
        if hot is everyone:
            d = hot_d
        else:
            d[hot] = hot_d
        if lazy and factor == 0:  # nothing measured (d is 0 at every latent): take the gradient path again
            estimate.last_bound[hot] = float("nan")
        elif lazy:
            estimate.update(hot, grad_d.float().flatten(1).norm(dim=1) * (scale_in / factor))
            estimate.last_bound[hot] = abs(settings.step_size) * scale_in * hot_grad.flatten(1).norm(dim=1)

    step.distance = d
    step.kernel = guidance.kernel(d, settings.sigma, settings.kernel)
    step.steered = torch.zeros(batch, dtype=torch.bool, device=latents.device)
    step.steered[hot] = True
    return preds, steered, step
