"""What the sampler needs from a model family, and the parts most families share.

An adapter wraps a diffusers pipeline the user already has. It turns prompts into conditionings
(dicts of batch-first tensors, see ``trasce.sampler``), calls the family's denoiser, makes the
initial noise and decodes the final latents. It never copies or modifies the pipeline's models.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from trasce.sampler import Cond, GradientCheck, is_count

#: ``guidance_scale`` and ``steps`` where nothing else states them: SD v1.4's, TraSCE's published setting.
FALLBACK_CALL_DEFAULTS: dict[str, float | int] = {"guidance_scale": 7.5, "steps": 50}

#: Modules compiled by ``compile_module`` with ``torch.compile``'s ``cudagraphs`` backend, which nothing
#: public tells apart from other backends (inductor's modes say so in ``get_compiler_config()``).
_CUDA_GRAPHS_BACKEND: weakref.WeakSet = weakref.WeakSet()


def compile_module(module: torch.nn.Module, **options) -> torch.nn.Module:
    """``torch.compile(module, **options)``, remembered as replaying CUDA graphs under the ``cudagraphs`` backend."""
    compiled = torch.compile(module, **options)
    if options.get("backend") == "cudagraphs":
        _CUDA_GRAPHS_BACKEND.add(compiled)
    return compiled


def _replays_cuda_graphs(module: torch.nn.Module) -> bool:
    """Whether ``module`` is compiled, itself, in place or through its ``forward``, to replay CUDA graphs."""
    if module in _CUDA_GRAPHS_BACKEND:
        return True
    for compiled in (module, getattr(module, "_compiled_call_impl", None), module.__dict__.get("forward")):
        config = getattr(compiled, "get_compiler_config", None)
        config = config() if callable(config) else None
        if isinstance(config, dict) and config.get("triton.cudagraphs"):
            return True
    return False


class Adapter:
    """Base class of the model-family adapters; subclasses fill in ``encode`` and ``denoise``."""

    #: diffusers pipeline class names this adapter accepts (subclasses of them are accepted too)
    pipeline_classes: tuple[str, ...] = ()
    #: human-readable family name, used in messages and reports
    family: str = ""
    #: the pipeline attribute holding the denoiser (``pipe.unet``, ``pipe.transformer``)
    denoiser_attribute: str = "unet"
    #: the family's own settings, attributes of the adapter (``TraSCEPipeline(family_options=...)``)
    options: tuple[str, ...] = ()

    def __init__(self, pipe):
        self.pipe = pipe
        # A UNet that embeds the guidance scale (LCM, in SD and SDXL alike) runs one guided pass, no CFG.
        cond_dim = getattr(getattr(pipe, self.denoiser_attribute).config, "time_cond_proj_dim", None)
        if cond_dim is not None:
            raise ValueError(
                f"this {self.family} denoiser embeds the guidance scale (time_cond_proj_dim={cond_dim}: an "
                "LCM-distilled model); it runs without classifier-free guidance, so TraSCE cannot steer it"
            )
        self._check: GradientCheck | None = None
        self._check_parts: tuple[int, ...] = ()  # the compiled parts that self._check was made for

    # -- conditioning and denoising -------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Cond:
        """Conditionings for ``prompts``, batch-first, on the model's device."""
        raise NotImplementedError

    def encode_unconditional(self, batch: int) -> Cond:
        """The unconditional (empty-prompt) branch for ``batch`` images, as the family's pipeline builds it.

        Usually the empty prompt's embedding; SDXL overrides it with zeros where diffusers does.
        """
        return self.encode([""] * batch)

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's raw prediction for ``model_input`` ``(B, ...)`` (in the denoiser's dtype) at ``t``."""
        raise NotImplementedError

    def denoise_latents(self, model_input: torch.Tensor, t: torch.Tensor, cond: Cond,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        """``denoise`` for latents of any dtype: casts them to the denoiser's, as the sampler holds them in float32.

        Under fp16/bf16 denoisers, a latent held in half precision would lose steering updates
        smaller than its rounding step (about 4e-3 per element near 1 in bf16, 5e-4 in fp16); the
        released loop runs in float32 throughout. Gradients flow back through the cast. ``dtype``
        is the denoiser's, given by callers in the denoising loop: diffusers' ``ModelMixin.dtype``
        walks the module (over a millisecond for SD v1.4's UNet on this CPU), too slow to ask at every call.
        """
        return self.denoise(model_input.to(dtype or self.dtype), t, cond)

    def set_timesteps(self, scheduler, num_inference_steps: int, device: torch.device, height: int,
                      width: int) -> None:
        """Set ``scheduler``'s timesteps as the family's diffusers pipeline does for this image size.

        Flow-matching families override it: their timestep shift may depend on the image size.
        """
        scheduler.set_timesteps(num_inference_steps, device=device)

    # -- geometry, noise and decoding -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser_module.dtype

    @property
    def denoiser_module(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attribute)

    def _compiled_parts(self) -> tuple[int, ...]:
        """Identities of the denoiser's parts that ``torch.compile`` reaches: the module itself
        (``torch.compile(unet)``), in place (``unet.compile()``), through its ``forward``
        (``unet.forward = torch.compile(unet.forward)``) or block by block (diffusers'
        ``compile_repeated_blocks``)."""
        from torch._dynamo.eval_frame import OptimizedModule

        return tuple(id(m) for m in self.denoiser_module.modules()
                     if isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
                     or hasattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable"))

    @property
    def compiled(self) -> bool:
        """Whether ``torch.compile`` reaches any part of the denoiser."""
        return bool(self._compiled_parts())

    @property
    def cuda_graphs(self) -> bool:
        """Whether a part of the denoiser is compiled to replay CUDA graphs: by inductor in a mode that
        records them (``reduce-overhead``, ``max-autotune``), or by ``compile_module`` with the
        ``cudagraphs`` backend (that backend applied by the caller directly goes unrecognised)."""
        return any(_replays_cuda_graphs(m) for m in self.denoiser_module.modules())

    def gradient_check(self) -> GradientCheck | None:
        """The check that holds a compiled denoiser's backward pass to the uncompiled one (``None``
        when nothing is compiled). It remembers the shapes that passed while the same parts stay
        compiled."""
        parts = self._compiled_parts()
        if not parts:
            return None
        if self._check is None or self._check_parts != parts:
            self._check, self._check_parts = GradientCheck(self.denoise_uncompiled), parts
        return self._check

    def denoise_uncompiled(self, model_input: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``denoise_latents`` with every ``torch.compile`` directive ignored: the eager module's answer."""
        with torch.compiler.set_stance("force_eager"):
            return self.denoise_latents(model_input, t, cond)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel; 1 for pixel-space models (no VAE)."""
        vae = getattr(self.pipe, "vae", None)
        return 1 if vae is None else self.pipe.vae_scale_factor

    @classmethod
    def call_defaults(cls, pipeline_class: type) -> dict[str, float | int]:
        """``guidance_scale`` and ``steps`` where a caller gives none: ``pipeline_class``'s own.

        A class method, so that a command can know them from a model folder's ``model_index.json``
        before it loads the model. Diffusers' defaults: CFG 7.5 and 50 steps for SD 1.x/2.x, 5 and 50
        for SDXL, 7 and 28 for SD3 (7.5 and 50 where a pipeline class states none).
        """
        parameters = inspect.signature(pipeline_class.__call__).parameters
        defaults = dict(FALLBACK_CALL_DEFAULTS)
        for key, name, kind in (("guidance_scale", "guidance_scale", float), ("steps", "num_inference_steps", int)):
            value = getattr(parameters.get(name), "default", None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                defaults[key] = kind(value)
        return defaults

    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` the model was trained at."""
        size = self.denoiser_module.config.sample_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return size[0] * self.vae_scale_factor, size[1] * self.vae_scale_factor

    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return 8 if self.vae_scale_factor > 1 else 1

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """``(height, width)``, each left out (``None``) taken from ``default_size``; ``ValueError`` unless the
        family can make images of that size (``size_multiple``)."""
        default = self.default_size()
        height, width = height or default[0], width or default[1]  # 0 as None, as diffusers has it
        for name, size in (("height", height), ("width", width)):
            if not is_count(size):
                raise ValueError(f"{name} must be a whole number of pixels of at least 1 (or None: the model's "
                                 f"{default[0]}x{default[1]}), got {size!r}")
        multiple = self.size_multiple()
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for {self.family}; "
                             f"got {height}x{width}")
        return height, width

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one image's latent, without the batch dimension."""
        f = self.vae_scale_factor
        return (self.denoiser_module.config.in_channels, height // f, width // f)

    def prepare_latents(self, batch: int, height: int, width: int, scheduler,
                        generator: torch.Generator | list[torch.Generator] | None = None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Initial noise ``(B, ...)`` scaled for ``scheduler``, drawn as diffusers draws it, in float32.

        With a list of generators each image is drawn from its own, which makes an image
        independent of the batch it is in; CPU generators make it independent of the device too.
        The noise is drawn in the denoiser's dtype (as diffusers draws it), then held in float32 (see
        ``denoise_latents``).
        """
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch, *self.latent_shape(height, width))
        device, dtype = self.device, self.dtype  # each walks the pipeline's modules: ask once
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        held = torch.promote_types(dtype, torch.float32)  # float64 denoisers keep float64
        # Flow-matching schedulers have no init_noise_sigma: they start from unit-variance noise.
        return latents.to(device, dtype).to(held) * getattr(scheduler, "init_noise_sigma", 1.0)

    def decode(self, latents: torch.Tensor, output_type: str) -> tuple[object, list[bool] | None]:
        """Images from final latents (PIL list, numpy ``(B, H, W, C)`` or torch ``(B, C, H, W)``) and
        the safety checker's flags, as diffusers' pipeline makes them (see ``postprocess``)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            images = latents  # pixel-space model: the latents are the images, in [-1, 1]
        else:
            # SD3's and FLUX's VAEs also shift their latents; SD 1.x/2.x's have no shift_factor.
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = latents.to(vae.dtype)
            images = vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
        return self.postprocess(images.detach(), output_type)

    @property
    def has_safety_checker(self) -> bool:
        """Whether decoding runs the pipeline's safety checker (SD 1.x/2.x pipelines loaded with one)."""
        return getattr(self.pipe, "safety_checker", None) is not None and hasattr(self.pipe, "run_safety_checker")

    def postprocess(self, images: torch.Tensor, output_type: str) -> tuple[object, list[bool] | None]:
        """Decoded ``images`` in ``[-1, 1]`` as ``output_type``, through the pipeline's safety checker if it has one.

        As in diffusers' SD 1.x/2.x pipeline, a checker blacks out the images it flags, and the flags
        are returned (``None``: the pipeline has no checker). A wrapped pipeline keeps its checker;
        ``trasce generate`` loads models without one unless given ``--safety-checker``.
        """
        flagged = None
        if self.has_safety_checker:
            images, flagged = self.pipe.run_safety_checker(images, self.device, self.pipe.safety_checker.dtype)
            flagged = [bool(flag) for flag in flagged]
        denormalize = None if flagged is None else [not flag for flag in flagged]
        return self.pipe.image_processor.postprocess(images, output_type=output_type,
                                                     do_denormalize=denormalize), flagged
