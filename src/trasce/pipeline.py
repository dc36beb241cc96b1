"""``TraSCEPipeline``: a diffusers pipeline the user already has, plus concept erasure.

    pipe = TraSCEPipeline.from_pretrained("CompVis/stable-diffusion-v1-4", preset="nudity",
                                          torch_dtype=torch.float16)
    images = pipe(["a photo of a beach"], generator=torch.Generator().manual_seed(0)).images
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import json
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch

from trasce import presets
from trasce.models import Adapter, adapter_class_for, adapter_for
from trasce.models.base import FALLBACK_CALL_DEFAULTS, compile_module
from trasce.sampler import DEFAULT_LAZY_TOLERANCE, EraseSettings, Mode, Step, is_count, sample

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteImageWarning(RuntimeWarning):
    """An image's final latent holds NaN or inf (see ``TraSCEOutput.finite``); a caller that refuses such
    images itself can ignore this category."""


@dataclass
class TraSCEOutput:
    """``images`` as diffusers returns them, and per-image erasure statistics over the steps.

    ``max_kernel``: the largest kernel value any step saw (near 1: the image came near the
    concept); ``min_distance``: the smallest ``||eps_p - eps_c||``; ``steered_steps``: how many
    steps ran the backward pass for the image. All are ``(B,)`` CPU tensors; the first two are
    ``None`` in mode ``none`` (no concept branch), ``steered_steps`` in modes that do not steer.
    ``nsfw_content_detected``: as diffusers' SD pipeline returns it, the flags of the pipeline's
    safety checker, whose flagged images are black (``None``: no checker ran). ``finite``: ``(B,)``
    bool, whether the image's final latent holds only finite numbers (one that overflowed to NaN or
    inf decodes to a black or garbled image; the call warns of it).
    """

    images: object
    max_kernel: torch.Tensor | None = None
    min_distance: torch.Tensor | None = None
    steered_steps: torch.Tensor | None = None
    nsfw_content_detected: list[bool] | None = None
    finite: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        """``(images, nsfw_content_detected)`` as diffusers' SD output gives them, without the flags where no
        checker ran; ``out[0]`` is the images, as in diffusers."""
        return (self.images,) if self.nsfw_content_detected is None else (self.images, self.nsfw_content_detected)

    def __getitem__(self, index: int):
        return self.to_tuple()[index]

    def stats(self, i: int) -> dict[str, float | int | bool]:
        """Image ``i``'s statistics as plain numbers, for a manifest (only those the mode has), and
        its safety checker's flag where one ran."""
        stats: dict[str, float | int | bool] = {}
        if self.max_kernel is not None:
            stats["max_kernel"] = round(float(self.max_kernel[i]), 6)
            stats["min_distance"] = round(float(self.min_distance[i]), 6)
        if self.steered_steps is not None:
            stats["steered_steps"] = int(self.steered_steps[i])
        if self.nsfw_content_detected is not None:
            stats["nsfw_content_detected"] = self.nsfw_content_detected[i]
        return stats


def embedded_model_path() -> Path:
    """The folder of the embedded toy model shipped inside the package."""
    return Path(__file__).parent / "toy" / "weights" / "model"


def resolve_model(model: str | Path) -> str:
    """``"toy"`` to the embedded model's folder; anything else (hub id or folder) as given."""
    return str(embedded_model_path()) if str(model) == "toy" else str(model)


#: Files of a model folder that make no image: its card and pictures (editing them keeps the model).
_NOT_MODEL_FILES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp")


def model_revision(model: str | Path) -> str | None:
    """What a model's images are made from, as one text, for a resumed run to check: for a folder, the
    SHA-256 of its files' names and contents (weights, configs, tokenizer; not hidden files, its card or
    pictures), read whole once per call; for a hub id, the revision its cache holds; ``None`` for a hub
    id out of the cache (nothing is downloaded).
    """
    from trasce.eval.base import file_sha256

    path = Path(resolve_model(model))
    if path.is_dir():
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
                       and p.suffix.lower() not in _NOT_MODEL_FILES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        listing = "".join(f"{name}\0{file_sha256(path / name)}\n" for name in files)
        return f"sha256:{hashlib.sha256(listing.encode('utf-8')).hexdigest()}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "model_index.json")
    except Exception:  # not a valid hub id: loading the model says what is wrong
        return None
    return f"revision:{Path(cached).parent.name}" if isinstance(cached, str) else None


def is_toy_model(model: str | Path) -> bool:
    """The embedded model, or a retrained one (a folder carrying ``trasce_toy.json``)."""
    return str(model) == "toy" or (Path(resolve_model(model)) / "trasce_toy.json").is_file()


def toy_defaults(model: str | Path) -> dict:
    """The settings a model folder recommends in its ``trasce_toy.json`` (the embedded model does); else none."""
    path = Path(resolve_model(model)) / "trasce_toy.json"
    return json.loads(path.read_text()).get("defaults", {}) if path.is_file() else {}


def _listed_parts(model: str | Path) -> dict | None:
    """``model``'s ``model_index.json`` (a folder's, or a hub id's from the cache); None where there is none."""
    from diffusers import DiffusionPipeline

    path = Path(resolve_model(model))
    index = path / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text())
    if path.exists():
        return None
    try:
        return dict(DiffusionPipeline.load_config(str(model)))
    except (OSError, ValueError):
        return None


def _pipeline_class(model: str | Path, listed: Mapping[str, Any]) -> type:
    """The diffusers pipeline class that ``model``'s ``model_index.json`` (``listed``) names.

    ``ValueError`` for a class diffusers does not have: custom code that ships with the model (which
    only runs when the caller trusts it) or a class of a newer diffusers.
    """
    import diffusers

    name = listed.get("_class_name")
    if name is None:
        raise ValueError(f"{model}'s model_index.json has no _class_name, the pipeline class that diffusers needs to "
                         "load it; is it a diffusers pipeline folder?")
    if isinstance(name, list | tuple):
        raise ValueError(f"{model}'s model_index.json names a custom pipeline ({'.'.join(map(str, name))}), code that "
                         "ships with the model; trasce runs no such code itself: load it in Python "
                         "(DiffusionPipeline.from_pretrained(..., trust_remote_code=True)) and wrap it, "
                         "TraSCEPipeline(pipe, concept=...)")
    pipeline_class = getattr(diffusers, str(name), None)
    if not isinstance(pipeline_class, type):
        raise ValueError(f"{model}'s model_index.json names the pipeline class {name!r}, which diffusers "
                         f"{diffusers.__version__} does not have (a class of a newer diffusers, or a custom one: "
                         "load it in Python and wrap it, TraSCEPipeline(pipe, concept=...))")
    return pipeline_class


def model_call_defaults(model: str | Path) -> dict[str, float | int]:
    """``guidance_scale`` and ``steps`` for ``model`` where neither the caller nor a prompt gives one.

    Known without loading the model: its ``trasce_toy.json`` recommendations where it has one,
    over its family's defaults (``Adapter.call_defaults``) for the pipeline class that its
    ``model_index.json`` names; 7.5 and 50 (SD v1.4's, TraSCE's published setting) where that cannot
    be read, which loading the model then reports. ``ValueError`` where it names a class that diffusers
    does not have (``_pipeline_class``).
    """
    listed = _listed_parts(model)
    if listed is not None:
        pipeline_class = _pipeline_class(model, listed)
        with contextlib.suppress(TypeError):  # an unsupported pipeline; loading it says so
            return _call_defaults(adapter_class_for(pipeline_class), pipeline_class, model)
    return {**FALLBACK_CALL_DEFAULTS, **toy_defaults(model)}


def _call_defaults(adapter_class: type[Adapter], pipeline_class: type, folder: str | Path | None) -> dict:
    """The family's defaults for ``pipeline_class``, under what ``folder``'s ``trasce_toy.json`` recommends."""
    return {**adapter_class.call_defaults(pipeline_class), **(toy_defaults(folder) if folder else {})}


def load_diffusers_pipeline(model: str | Path, torch_dtype: torch.dtype | None = None, scheduler: str | None = None,
                            safety_checker: bool = True, **kwargs):
    """Load a diffusers pipeline from a hub id (cache) or a folder, including VAE-less ones.

    A folder whose ``model_index.json`` lists no VAE is a pixel-space model (like the embedded
    one): diffusers needs ``vae=None`` passed explicitly for it. Its scheduler is reloaded from
    its own config because ``StableDiffusionPipeline`` turns ``clip_sample`` off on load, which
    only latent models want.

    ``scheduler`` names one of ``SCHEDULERS``. By default the model's own is kept, except PNDM
    (SD v1.x's), which would drop TraSCE's steering updates (``trasce.sampler.discards_steering``):
    it becomes DDIM, the scheduler of TraSCE's published settings, in every mode, so that the methods
    compared on one model share a scheduler. Other schedulers that would drop them are left for the
    steering modes to refuse with what to set instead (DDIM's config need not fit them), and so is
    any scheduler of a pipeline the user wraps.

    ``safety_checker=False`` leaves out the safety checker of an SD 1.x/2.x model (diffusers loads
    it by default, and it blacks out the images it flags), so that judges see what the model made.
    """
    from diffusers import DiffusionPipeline

    path = Path(resolve_model(model))
    index = path / "model_index.json"
    if path.exists() and not index.exists():
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    # For a hub id too (from the cache), so that the parts left out are not loaded at all; where
    # it cannot be read, from_pretrained, below, says what is wrong.
    listed = _listed_parts(model)
    pixel_space = index.exists() and listed.get("vae", [None])[0] is None
    if listed is not None:
        # The optional parts a folder lists as absent, among those its pipeline class takes (passing
        # SDXL, SD3 or FLUX a safety_checker=None only earns a warning that it is ignored).
        takes = inspect.signature(_pipeline_class(model, listed)).parameters
        for optional in ("vae", "safety_checker", "feature_extractor"):
            if listed.get(optional, [None])[0] is None and optional in takes:
                kwargs.setdefault(optional, None)
        if not safety_checker and "safety_checker" in takes:
            kwargs.setdefault("safety_checker", None)
            kwargs.setdefault("requires_safety_checker", False)
    with warnings.catch_warnings():
        # StableDiffusionPipeline warns (and prints the whole config) about clip_sample, which
        # the pixel model needs on and gets back below.
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else str(model),
                                                     torch_dtype=torch_dtype, **kwargs)
        except OSError as error:
            if path.exists():
                raise
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            cause = cause.replace(" Please check out the root cause in the stacktrace above.", "")  # none is shown
            if listed is None:  # not even its model_index.json is in the cache
                raise OSError(f"cannot load model {str(model)!r}: there is no such folder here, and no hub model of "
                              "that id is in the local cache or could be downloaded (offline, a misspelt id, or a "
                              "gated model without a token); give a diffusers folder, a cached hub id, or 'toy'. "
                              f"diffusers said: {cause}") from error
            raise OSError(f"cannot load model {str(model)!r}: it is no folder here, and as a hub id: {cause} (give a "
                          "diffusers folder, a cached hub id, or 'toy')") from error
    if not safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # a hub id whose model_index.json could not be read before loading
    if pixel_space:
        from diffusers.image_processor import VaeImageProcessor

        pipe.scheduler = type(pipe.scheduler).from_pretrained(path, subfolder="scheduler")
        # Without a VAE, StableDiffusionPipeline assumes 8 pixels per latent pixel; here it is 1,
        # which diffusers' own __call__ then needs to draw latents of the right size.
        pipe.vae_scale_factor = 1
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=1)
    if scheduler is None and type(pipe.scheduler).__name__ == "PNDMScheduler":
        scheduler = "ddim"
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    return pipe


_frozen_lock = threading.Lock()
_frozen: dict[torch.nn.Module, tuple[int, list]] = {}  # module -> (calls inside, the flags it had)


@contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off on ``module``'s parameters for the block, then restore each flag.

    The steering backward pass wants ``dd/dx`` only. Parameters that require gradients make autograd
    keep the inputs of every layer for weight gradients nobody reads (one exact step of SD v1.4 at
    512 px on a CPU: 4.13 GiB against 3.69), and make a ``torch.compile``d denoiser compute those
    weight gradients in its backward. Calls that overlap (threads sharing one pipeline) share one
    freeze: the first in saves the flags, the last out restores them (a compiled module counts as the
    module it wraps). Weights made under ``torch.inference_mode`` are left alone: their flag cannot change.
    """
    module = getattr(module, "_orig_mod", module)
    with _frozen_lock:
        inside, flags = _frozen.get(module, (0, []))
        if not inside:
            flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()
                     if not parameter.is_inference()]
            for parameter, _ in flags:
                parameter.requires_grad_(False)
        _frozen[module] = (inside + 1, flags)
    try:
        yield
    finally:
        with _frozen_lock:
            inside, flags = _frozen.pop(module)
            if inside > 1:
                _frozen[module] = (inside - 1, flags)
            else:
                for parameter, flag in flags:
                    parameter.requires_grad_(flag)


#: What to give instead of a diffusers pipeline argument that TraSCEPipeline's call does not take.
INSTEAD_OF_DIFFUSERS: dict[str, str] = {
    "negative_prompt": "the concept's branch takes its place: give concept= (per prompt, if need be); "
                       "mode='negative_prompt' is diffusers' negative prompting with the concept",
    "negative_prompt_embeds": "give the concept's text as concept=; trasce encodes it",
    "prompt_embeds": "give the prompt's text; trasce encodes the prompt and concept texts itself",
    "callback_on_step_end": "give callback=, called after each step with a trasce.sampler.Step (its latents, "
                            "distance, kernel and whether the image was steered)",
    "eta": "the scheduler steps with its defaults, as the released loop did (DDIM's eta 0)",
}


def _not_taken(arguments: Mapping[str, Any]) -> str:
    """The ``TypeError`` message for diffusers arguments the call does not take."""
    name = sorted(arguments)[0]
    instead = INSTEAD_OF_DIFFUSERS.get(name)
    if instead is None:
        parameters = inspect.signature(TraSCEPipeline.__call__).parameters
        takes = [p for p in parameters if p not in ("self", "diffusers_only")]
        instead = f"it takes {', '.join(takes)}"
    more = f" (and {', '.join(map(repr, sorted(arguments)[1:]))})" if len(arguments) > 1 else ""
    return f"TraSCEPipeline's call does not take {name!r}{more}: {instead}"


def _outside_inference_mode(call: Callable) -> Callable:
    """``call`` without gradients, as diffusers' pipelines run, but outside ``torch.inference_mode``.

    Servers often call pipelines under inference mode, which no block inside can leave for
    ``torch.enable_grad``: steering, which takes a gradient, would fail there.
    """
    @functools.wraps(call)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return call(*args, **kwargs)

    return wrapper


def flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` samples a flow-matching model (SD3, FLUX), by its class or its config."""
    config = scheduler.config
    return (type(scheduler).__name__.startswith("FlowMatch") or config.get("prediction_type") == "flow_prediction"
            or bool(config.get("use_flow_sigmas")))


#: What a call's ``output_type`` may be: PIL images, numpy or torch arrays in [0, 1], or the final latents.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: ``--compile`` choices: ``torch.compile``'s modes, and ``cudagraphs``, its backend that replays CUDA
#: graphs of the uncompiled kernels (no code generation by inductor, so it compiles faster).
COMPILE_CHOICES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cudagraphs")
#: The choices that record CUDA graphs on a GPU.
CUDA_GRAPH_CHOICES = ("reduce-overhead", "max-autotune", "cudagraphs")


def compile_options(choice: str) -> dict:
    """``torch.compile``'s keyword arguments for a ``--compile`` choice (``COMPILE_CHOICES``)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"unknown compile choice {choice!r}; expected one of {', '.join(COMPILE_CHOICES)}")
    if choice == "cudagraphs":
        # Static shapes: the backend keys its recorded graphs by the graph's integer inputs, which need not hold
        # the batch size, so a graph made dynamic in the batch replayed one batch's recording for another (an H200
        # run: "The size of tensor a (8) must match the size of tensor b (12)" once three branches had run).
        return {"backend": "cudagraphs", "dynamic": False}
    return {} if choice == "default" else {"mode": choice}


def set_scheduler(pipe, name: str) -> None:
    """Swap ``pipe``'s scheduler for ``name`` (see ``SCHEDULERS``), keeping its noise schedule.

    The names are discrete-time schedulers for SD 1.x/2.x and SDXL: flow-matching families (SD3,
    FLUX) predict a velocity that they would read as noise, so they refuse. When the scheduler
    changes, a latent model's new one gets ``clip_sample=False`` (what diffusers' latent pipelines
    use), whatever the old config said.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    if flow_matching(pipe.scheduler):
        raise ValueError(f"scheduler {name!r} is for noise- and velocity-predicting models (SD 1.x/2.x, SDXL); "
                         f"this pipeline's {type(pipe.scheduler).__name__} is flow matching (SD3, FLUX): leave the "
                         "scheduler as it is")
    cls = getattr(diffusers, SCHEDULERS[name])
    if type(pipe.scheduler) is not cls:
        latent = getattr(pipe, "vae", None) is not None
        parameters = inspect.signature(cls.__init__).parameters
        extra = {"clip_sample": False} if latent and "clip_sample" in parameters else {}
        if "skip_prk_steps" in parameters:  # PNDM as SD v1.x ships it: PLMS steps only, `steps` of them
            extra["skip_prk_steps"] = True
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


class TraSCEPipeline:
    """Erase ``concept`` from what ``pipe`` generates; every call is diffusers-shaped.

    ``mode``: ``trasce`` (both parts), ``negation`` (part 1 alone), ``steering`` (part 2 with
    plain CFG), ``negative_prompt`` (diffusers' conventional negative prompt) or ``none``.
    ``loss_scale``/``step_size``/``sigma`` are the released script's ``guidance_loss_scale``/
    ``discriminator_guidance_scale``/``sigma``; a ``preset`` fills them and the concept.
    ``lazy_tolerance`` skips backward passes whose update is estimated to be smaller, as an RMS per latent
    element (``None``: exact, every backward pass runs). ``one_call``: a steered image's three
    branches in one denoiser call under gradients (same numbers, fewer kernel launches), or in two
    (``False``); ``None`` chooses one call on CUDA for a few images' latents, else two, and two for a
    denoiser that replays CUDA graphs (``EraseSettings.uses_one_call``). ``family_options`` sets the model
    family's own settings (``Adapter.options``: SDXL's ``original_size``, ``target_size``, ``crops_coords_top_left``;
    SD3's ``max_sequence_length``; FLUX's ``distilled_guidance`` and ``max_sequence_length``). They
    belong to the adapter, which copies made by :meth:`with_settings` share with this pipeline.
    """

    def __init__(self, pipe, concept: str | None = None, preset: str | None = None, mode: Mode = "trasce",
                 loss_scale: float | None = None, step_size: float | None = None, sigma: float | None = None,
                 kernel: str = "exp", lazy_tolerance: float | None = DEFAULT_LAZY_TOLERANCE,
                 steer_window: tuple[float, float] = (0.0, 1.0), one_call: bool | None = None,
                 family_options: dict | None = None):
        self.pipe = pipe
        self.adapter: Adapter = adapter_for(pipe)
        for key, value in (family_options or {}).items():
            if key not in self.adapter.options:
                raise ValueError(f"{key!r} is not an option of {self.adapter.family}; its options: "
                                 f"{', '.join(self.adapter.options) or 'none'}")
            setattr(self.adapter, key, value)
        #: ``guidance_scale`` and ``steps`` where a call gives none: the model family's (``Adapter.call_defaults``),
        #: or what the folder the model was loaded from recommends in ``trasce_toy.json``
        loaded_from = getattr(pipe.config, "_name_or_path", None)  # None for a pipeline built in memory
        self.call_defaults = _call_defaults(type(self.adapter), type(pipe), loaded_from)
        self._set_erasure(concept=concept, preset=preset, mode=mode, loss_scale=loss_scale, step_size=step_size,
                          sigma=sigma, kernel=kernel, lazy_tolerance=lazy_tolerance, steer_window=steer_window,
                          one_call=one_call)

    def _set_erasure(self, concept: str | None, preset: str | None, mode: Mode, loss_scale: float | None,
                     step_size: float | None, sigma: float | None, **settings) -> None:
        """``concept``, ``preset`` and ``settings`` from the constructor's arguments, checked."""
        if concept is None and preset is None and mode == "none":
            resolved = ("", 1.0, 1.0, 1.0)  # plain generation needs no concept
        else:
            resolved = presets.resolve(preset, concept, loss_scale, step_size, sigma)
        self.concept = resolved[0]
        self.preset = preset
        self.settings = EraseSettings(mode=mode, loss_scale=resolved[1], step_size=resolved[2], sigma=resolved[3],
                                      **settings)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str | Path = "toy", torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, scheduler: str | None = None,
                        safety_checker: bool = True, pipeline_kwargs: dict | None = None,
                        **settings) -> TraSCEPipeline:
        """Load ``model`` (hub id, folder, or ``"toy"``) the diffusers way, then wrap it.

        ``settings`` are ``TraSCEPipeline``'s own arguments (``concept``, ``preset``, ``mode``...).
        ``scheduler`` and ``safety_checker``: see ``load_diffusers_pipeline``.
        """
        pipe = load_diffusers_pipeline(model, torch_dtype=torch_dtype, scheduler=scheduler,
                                       safety_checker=safety_checker, **(pipeline_kwargs or {}))
        if device is not None:
            pipe.to(device)
        return cls(pipe, **settings)

    @classmethod
    def from_pipe(cls, pipe, **settings) -> TraSCEPipeline:
        """Wrap an existing diffusers pipeline (its models are shared, not copied)."""
        return cls(pipe, **settings)

    def to(self, *args, **kwargs) -> TraSCEPipeline:
        """Move (or cast) the wrapped pipeline, as ``DiffusionPipeline.to`` takes it: a device, a dtype, or both."""
        self.pipe.to(*args, **kwargs)
        return self

    def enable_gradient_checkpointing(self) -> TraSCEPipeline:
        """Keep fewer denoiser activations for the steering backward pass and recompute them in it.

        Less memory for about one more forward pass of the prompt and concept branches per steered
        step; calls without gradients (plain generation, unsteered steps) are unaffected. It is a
        setting of the denoiser module, so it holds for every pipeline sharing that module.
        """
        module = self.adapter.denoiser_module
        if not getattr(module, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(module).__name__} does not support gradient checkpointing")
        module.enable_gradient_checkpointing()
        return self

    def disable_gradient_checkpointing(self) -> TraSCEPipeline:
        self.adapter.denoiser_module.disable_gradient_checkpointing()
        return self

    def compile(self, **options) -> TraSCEPipeline:
        """Replace the pipeline's denoiser by ``torch.compile(denoiser, **options)``, diffusers' way.

        ``options`` are ``torch.compile``'s (``mode="reduce-overhead"``, ``fullgraph=True``...). Every
        pipeline sharing ``self.pipe`` then runs the compiled denoiser, plain generation included.
        The first call of each batch shape, and the first with gradients, compiles (minutes); trasce
        calls run with the parameters frozen, so diffusers' own calls (parameters as they were)
        compile once more.

        A compiled denoiser, compiled here or by the user, has its backward pass checked against the
        uncompiled module's before the first steering call of each shape (``GradientCheck``: two
        more forward and backward passes, once per shape). Compilers have shipped wrong backward
        passes (torch 2.13's inductor on CPU), and the call stops with ``CompiledGradientError``
        rather than steer with one. A denoiser compiled to replay CUDA graphs (``mode="reduce-overhead"``
        or ``"max-autotune"``, ``backend="cudagraphs"``) takes two calls per steered step unless
        ``one_call`` says otherwise (``EraseSettings.uses_one_call``).
        """
        name = self.adapter.denoiser_attribute
        if self.adapter.compiled:
            raise ValueError(f"the pipeline's {name} is already compiled")
        module = getattr(self.pipe, name)
        setattr(self.pipe, name, compile_module(module, **options))
        return self

    def with_settings(self, **changes) -> TraSCEPipeline:
        """A copy sharing the same models, with some of the constructor's settings changed, checked as it checks them.

        ``changes``: ``concept``, ``preset``, ``mode``, ``sigma``... (not ``family_options``, which
        copies share). A new ``preset`` brings its concept and settings, except those given with it.
        """
        current = {field.name: getattr(self.settings, field.name) for field in fields(self.settings)}
        current.update(concept=self.concept or None, preset=self.preset)  # "": none was needed (mode none)
        unknown = sorted(set(changes) - set(current))
        if unknown:
            raise TypeError(f"with_settings() got {', '.join(map(repr, unknown))}; it takes "
                            f"{', '.join(sorted(current))}")
        if "preset" in changes:
            current.update(concept=None, loss_scale=None, step_size=None, sigma=None)
        other = object.__new__(TraSCEPipeline)
        other.__dict__.update(self.__dict__)
        other.call_defaults = dict(self.call_defaults)  # the copy's own: only the models and adapter are shared
        other._set_erasure(**{**current, **changes})
        return other

    # -- generation --------------------------------------------------------------------------
    @_outside_inference_mode
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        concept: str | Sequence[str] | None = None,
        callback: Callable[[Step], None] | None = None,
        progress: bool = False,
        return_dict: bool = True,
        **diffusers_only,
    ) -> TraSCEOutput | tuple:
        """Generate images for ``prompt`` with the concept erased.

        ``num_inference_steps`` and ``guidance_scale`` default to ``call_defaults``, the model's (as the
        diffusers pipeline's own, but true CFG at 3.5 for FLUX). ``guidance_scale`` and ``concept`` may
        be given per prompt; ``generator`` is one
        generator for the whole batch (diffusers' semantics) or one per image. With
        ``output_type="latent"``, ``images`` holds the final latents ``(B, C, h, w)``. ``return_dict=False``
        returns a tuple, as the wrapped pipeline's own does: ``(images, nsfw_content_detected)`` for SD
        1.x/2.x, ``(images,)`` otherwise. diffusers' other arguments (``negative_prompt``,
        ``prompt_embeds``, ``eta``...) are refused with what to give instead.
        """
        if diffusers_only:
            raise TypeError(_not_taken(diffusers_only))
        if not isinstance(prompt, (str, Sequence)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings; it holds "
                            f"{', '.join(sorted({type(p).__name__ for p in prompts if not isinstance(p, str)}))}")
        if num_inference_steps is None:
            num_inference_steps = int(self.call_defaults["steps"])
        if guidance_scale is None:
            guidance_scale = float(self.call_defaults["guidance_scale"])
        for name, count in (("num_images_per_prompt", num_images_per_prompt),
                            ("num_inference_steps", num_inference_steps)):
            if not is_count(count):
                raise ValueError(f"{name} must be a whole number of at least 1, got {count!r}")
        if output_type not in OUTPUT_TYPES:  # before the denoising, not after it
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        if generator is not None and not isinstance(generator, (torch.Generator, list, tuple)):
            raise TypeError(f"generator must be a torch.Generator or a list of them (one per image), got "
                            f"{type(generator).__name__} {generator!r}; torch.Generator().manual_seed({generator!r}) "
                            "makes one from a seed")
        n = num_images_per_prompt
        images_prompts = [p for p in prompts for _ in range(n)]
        batch = len(images_prompts)
        scales = self._per_image(guidance_scale, len(prompts), n, "guidance_scale", float)
        concept = self.concept if concept is None else concept
        concepts = self._per_image(concept, len(prompts), n, "concept", str, f". {presets.ONE_CONCEPT}")
        for text, concept_text in zip(images_prompts, concepts, strict=True):
            if self.settings.mode != "none" and not concept_text.strip():
                raise ValueError(f"an empty concept for prompt {text!r}: nothing would be erased; name the concept "
                                 "(or leave concept out to use the pipeline's own)")
        if not all(math.isfinite(scale) for scale in scales):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")

        height, width = self.adapter.image_size(height, width)

        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; give one or one per image")
        if isinstance(generator, tuple):
            generator = list(generator)  # diffusers' noise and schedulers take one generator per image as a list

        # A copy for this call: calls that overlap (threads sharing the pipeline) would otherwise set and
        # step one scheduler's timesteps in turn, and the wrapped pipeline's is left as it was.
        scheduler = copy.deepcopy(self.pipe.scheduler)
        # Timesteps first: some schedulers' init_noise_sigma depends on them (Euler); flow-matching
        # families shift them by image size, so the adapter sets them.
        self.adapter.set_timesteps(scheduler, num_inference_steps, self.adapter.device, height, width)
        x = self.adapter.prepare_latents(batch, height, width, scheduler, generator, latents)

        cond_p = self.adapter.encode(images_prompts)
        cond_0 = self.adapter.encode_unconditional(batch)
        cond_c = self.adapter.encode(concepts) if self.settings.mode != "none" else cond_0
        scale_tensor = torch.tensor(scales, device=self.adapter.device, dtype=torch.float32)
        scale_arg: float | torch.Tensor = scales[0] if len(set(scales)) == 1 else scale_tensor

        if self.settings.steers and next(self.adapter.denoiser_module.parameters()).is_inference():
            raise ValueError(f"this {type(self.pipe).__name__}'s weights were loaded under torch.inference_mode, "
                             "which keeps them out of autograd; the steering gradient needs them: load the model "
                             "outside inference mode (calls may still run inside it)")
        with frozen_parameters(self.adapter.denoiser_module):
            x, max_kernel, min_distance, steered = self._denoise(scheduler, x, cond_0, cond_p, cond_c, scale_arg,
                                                                 num_inference_steps, generator, callback, progress)
        finite = x.flatten(1).isfinite().all(dim=1).cpu()
        if not finite.all():
            bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
            warnings.warn(f"image{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of the batch "
                          f"({images_prompts[bad[0]]!r}, CFG {scales[bad[0]]:g}, ...) came out with NaN or inf in "
                          f"{'their' if len(bad) > 1 else 'its'} final latent, which decodes to a black or garbled "
                          "image: a guidance scale or step size this large overflows, or the dtype's range is too "
                          "small (fp16: try bf16 or fp32)", NonFiniteImageWarning, stacklevel=3)
        # Latents are returned in the denoiser's dtype, as diffusers returns them.
        flagged = None
        if output_type == "latent":
            images = x.to(self.adapter.dtype)
        else:
            with warnings.catch_warnings():
                # numpy's cast of those NaNs to 8 bits says again, less clearly, what the warning above said
                warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
                images, flagged = self.adapter.decode(x, output_type)
        if hasattr(self.pipe, "maybe_free_model_hooks"):
            self.pipe.maybe_free_model_hooks()  # as diffusers' pipelines end: offloaded models go back to the CPU
        out = TraSCEOutput(images=images, max_kernel=max_kernel, min_distance=min_distance, steered_steps=steered,
                           nsfw_content_detected=flagged, finite=finite)
        if return_dict:
            return out
        # As the wrapped pipeline's own return_dict=False: SD 1.x/2.x's pairs the images with the checker's
        # flags (None where none ran), the other families return the images alone.
        return (images, flagged) if hasattr(self.pipe, "safety_checker") else (images,)

    def _denoise(self, scheduler, x, cond_0, cond_p, cond_c, scale, num_inference_steps, generator, callback,
                 progress):
        """Run the sampler over ``x``; return the final latents and the per-image statistics (on the CPU)."""
        max_kernel = min_distance = steered = None
        denoise = partial(self.adapter.denoise_latents, dtype=self.adapter.dtype)  # the dtype asked once per call
        steps = sample(denoise, scheduler, x, cond_0, cond_p, cond_c, scale, self.settings,
                       num_inference_steps, generator=generator, timesteps_set=True,
                       gradient_check=self.adapter.gradient_check(), cuda_graphs=self.adapter.cuda_graphs)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=len(scheduler.timesteps), desc="denoising", leave=False)
        for step in steps:
            x = step.latents
            # Statistics stay on the device until the end: a copy to the CPU every step would
            # synchronise and stall the GPU's queue of launched kernels.
            if step.kernel is not None:
                k, d = step.kernel.float(), step.distance.float()
                max_kernel = k if max_kernel is None else torch.maximum(max_kernel, k)
                min_distance = d if min_distance is None else torch.minimum(min_distance, d)
            if step.steered is not None:
                s = step.steered.long()
                steered = s if steered is None else steered + s
            if callback is not None:
                callback(step)
        if steered is None and self.settings.steers:  # a steer window that held none of the steps
            steered = torch.zeros(x.shape[0], dtype=torch.long)
        return (x, *(None if v is None else v.cpu() for v in (max_kernel, min_distance, steered)))

    @staticmethod
    def _per_image(value, n_prompts: int, per_prompt: int, name: str, kind: type, hint: str = "") -> list:
        """Expand a scalar or per-prompt sequence to one value per image; ``hint`` ends its errors."""
        if isinstance(value, (str, int, float)) or getattr(value, "ndim", None) == 0:  # (0-d tensors, numpy)
            return [kind(value)] * (n_prompts * per_prompt)
        values = list(value)
        if len(values) != n_prompts:
            raise ValueError(f"{name} has {len(values)} values for {n_prompts} prompts; give one or one per "
                             f"prompt{hint}")
        if kind is str and not all(isinstance(v, str) for v in values):
            raise TypeError(f"{name} per prompt must be texts, got {values!r}{hint}")
        return [kind(v) for v in values for _ in range(per_prompt)]
