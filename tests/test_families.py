"""SDXL, SD3 and FLUX adapters against diffusers' own pipelines and a literal one-step transcription.

Tiny random models (``trasce.models.random``'s ``tiny-*``), 64x96 pixels (not square, so that
height and width cannot be swapped unnoticed), a few steps. FLUX runs
with true CFG, so its references are diffusers' ``true_cfg_scale`` with a negative prompt (``""``
for plain guidance), and latents are compared unpacked ``(B, C, h, w)``.
"""

import copy
import re

import numpy as np
import pytest
import torch

from trasce import TraSCEPipeline
from trasce.models import (
    FluxAdapter,
    StableDiffusion3Adapter,
    StableDiffusionXLAdapter,
    adapter_for,
)
from trasce.models.random import build

STEPS = 3
HEIGHT, WIDTH = 64, 96
SCALE = 5.0
FAMILIES = ("sdxl", "sd3", "flux")
# Steering settings per family: sigma near each tiny model's ||pred_p - pred_c|| at the first step,
# so that the kernel is neither ~0 nor ~1 and the update is measurable.
STEER = {"sdxl": dict(loss_scale=3.0, step_size=2.0, sigma=2.0), "sd3": dict(loss_scale=3.0, step_size=10.0, sigma=6.0),
         "flux": dict(loss_scale=3.0, step_size=2.0, sigma=4.0)}


def _tiny(family: str):
    torch.manual_seed(0)
    pipe = build(f"tiny-{family}")
    # Random weights give tiny, nearly identical predictions; a larger output scale makes the
    # branches differ the way a trained model's do (as conftest's tiny SD does).
    out = pipe.unet.conv_out if family == "sdxl" else pipe.transformer.proj_out
    with torch.no_grad():
        out.weight.mul_(4)
    return pipe


@pytest.fixture(scope="module")
def pipes():
    return {family: _tiny(family) for family in FAMILIES}


def _latents(pipe, batch=1, seed=0):
    shape = adapter_for(pipe).latent_shape(HEIGHT, WIDTH)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _pack(pipe, latents):
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def _diffusers(family, pipe, prompts, latents, negative, steps=STEPS, output_type="latent", **kwargs):
    """diffusers' own pipeline; ``negative=None`` is plain CFG. Latents come back unpacked."""
    common = dict(num_inference_steps=steps, height=HEIGHT, width=WIDTH, output_type=output_type)
    if family != "flux":
        return pipe(prompts, negative_prompt=negative, guidance_scale=SCALE, latents=latents.clone(), **common,
                    **kwargs).images
    negative = negative or [""] * len(prompts)  # true CFG needs a negative prompt; "" is plain CFG
    images = pipe(prompts, negative_prompt=negative, true_cfg_scale=SCALE, latents=_pack(pipe, latents.clone()),
                  **common, **kwargs).images
    return pipe._unpack_latents(images, HEIGHT, WIDTH, pipe.vae_scale_factor) if output_type == "latent" else images


def _ours(pipe, prompts, latents, steps=STEPS, output_type="latent", callback=None, **settings):
    trasce = TraSCEPipeline.from_pipe(pipe, **settings)
    return trasce(prompts, num_inference_steps=steps, guidance_scale=SCALE, latents=latents.clone(), height=HEIGHT,
                  width=WIDTH, output_type=output_type, callback=callback)


def test_adapters_are_picked_from_the_pipeline_class(pipes):
    from diffusers import StableDiffusionXLPipeline

    expected = {"sdxl": StableDiffusionXLAdapter, "sd3": StableDiffusion3Adapter, "flux": FluxAdapter}
    for family, pipe in pipes.items():
        assert type(TraSCEPipeline.from_pipe(pipe, concept="x").adapter) is expected[family]

    class MySDXL(StableDiffusionXLPipeline):  # a user's subclass gets its base class' adapter
        pass

    assert type(adapter_for(MySDXL(**pipes["sdxl"].components))) is StableDiffusionXLAdapter


def test_default_sizes(pipes):
    # SDXL and SD3: the denoiser's sample_size x the VAE factor; tiny FLUX sets default_sample_size
    assert adapter_for(pipes["sdxl"]).default_size() == (64, 64)
    assert adapter_for(pipes["sd3"]).default_size() == (64, 64)
    assert adapter_for(pipes["flux"]).default_size() == (64, 64)
    assert adapter_for(pipes["sd3"]).size_multiple() == 16  # VAE factor 8 x patch size 2
    assert adapter_for(pipes["flux"]).size_multiple() == 16  # VAE factor 8 x 2x2 packing


@pytest.mark.parametrize("mode", ["none", "negative_prompt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_diffusers_pipeline(pipes, family, mode):
    pipe = pipes[family]
    prompts, concept = ["a red apple", "a blue car"], "an apple"
    latents = _latents(pipe, batch=2)
    expected = _diffusers(family, pipe, prompts, latents, None if mode == "none" else [concept] * 2)
    ours = _ours(pipe, prompts, latents, concept=concept, mode=mode).images
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_at_cfg_one_or_less_guidance_is_off_as_in_diffusers(pipes, family):
    pipe = pipes[family]
    latents = _latents(pipe)
    common = dict(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="latent")
    if family == "flux":  # true CFG at 0.5 is off in diffusers: the prompt's prediction alone
        expected = pipe._unpack_latents(pipe(["a red apple"], negative_prompt=[""], true_cfg_scale=0.5,
                                             latents=_pack(pipe, latents.clone()), **common).images,
                                        HEIGHT, WIDTH, pipe.vae_scale_factor)
    else:
        expected = pipe(["a red apple"], guidance_scale=0.5, latents=latents.clone(), **common).images
    ours = TraSCEPipeline.from_pipe(pipe, mode="none")(["a red apple"], guidance_scale=0.5, latents=latents.clone(),
                                                       **common).images
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_decoded_images_match_diffusers(pipes, family):
    pipe = pipes[family]
    latents = _latents(pipe)
    expected = _diffusers(family, pipe, ["a red apple"], latents, None, steps=2, output_type="np")
    ours = _ours(pipe, ["a red apple"], latents, steps=2, output_type="np", mode="none").images
    assert ours.shape == (1, HEIGHT, WIDTH, 3)
    assert np.allclose(ours, expected, atol=1e-4), np.abs(ours - expected).max()
    # return_dict=False: these families' pipelines return (images,), with no safety checker's flags
    tupled = TraSCEPipeline.from_pipe(pipe, mode="none")(["a red apple"], num_inference_steps=2, guidance_scale=SCALE,
                                                          latents=latents.clone(), height=HEIGHT, width=WIDTH,
                                                          output_type="np", return_dict=False)
    assert type(tupled) is tuple and len(tupled) == 1 and np.array_equal(tupled[0], ours)


def test_sdxl_empty_branch_follows_force_zeros_for_empty_prompt(pipes):
    """With the flag off, diffusers' unconditional branch is the empty prompt's embedding, not zeros."""
    pipe = pipes["sdxl"]
    latents = _latents(pipe)
    zeros = _ours(pipe, "a red apple", latents, mode="none").images
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        expected = _diffusers("sdxl", pipe, ["a red apple"], latents, None)
        ours = _ours(pipe, "a red apple", latents, mode="none").images
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    assert (ours - zeros).abs().max() > 1e-2  # the two unconditional branches do differ


def test_sd3_without_t5_and_with_dynamic_shifting(pipes):
    """T5 may be left out (diffusers pads with zeros); SD3.5-style schedulers shift by image size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = StableDiffusion3Pipeline(**{**pipes["sd3"].components, "text_encoder_3": None, "tokenizer_3": None,
                                       "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    latents = _latents(pipe, batch=2)
    prompts, concept = ["a red apple", "a blue car"], "an apple"
    expected = _diffusers("sd3", pipe, prompts, latents, [concept] * 2)
    ours = _ours(pipe, prompts, latents, concept=concept, mode="negative_prompt").images
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_flux_distilled_guidance_is_diffusers_guidance_scale(pipes):
    pipe = pipes["flux"]
    latents = _latents(pipe)
    expected = _diffusers("flux", pipe, ["a red apple"], latents, ["an apple"], guidance_scale=2.0)
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple", mode="negative_prompt",
                                      family_options={"distilled_guidance": 2.0})
    ours = trasce("a red apple", num_inference_steps=STEPS, guidance_scale=SCALE, latents=latents.clone(),
                  height=HEIGHT, width=WIDTH, output_type="latent").images
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    default = _ours(pipe, "a red apple", latents, concept="an apple", mode="negative_prompt").images
    assert (ours - default).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"^'original_size' is not an option of FLUX.* its options: "
                                         r"distilled_guidance, max_sequence_length$"):
        TraSCEPipeline.from_pipe(pipe, concept="an apple", family_options={"original_size": (64, 64)})


# -- one TraSCE step, written out literally per family ---------------------------------------------
# Each transcription: encode the three branches with the pipeline's own encode_prompt, one
# denoiser call on [x, x] with gradients for the prompt and concept (the empty branch without),
# d = global L2 norm of the prediction difference (noise for SDXL, velocity for SD3/FLUX), the exp
# kernel loss, one gradient step on the latent the denoiser sees (x / c, where a scheduler such as
# SDXL's Euler scales its sample x by c = sqrt(sigma^2 + 1); c = 1 for flow matching), the
# modified negation from the old latent's predictions, and scheduler.step from the steered latent.

def _steer_literally(model, x, scheduler, t, conds_0, conds_pc, lam, eta, sigma, c=1.0):
    x_in = x / c
    with torch.no_grad():
        pred_0 = model(x_in, *conds_0)
    xg = x_in.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        pred_p, pred_c = model(torch.cat([xg, xg]), *conds_pc).chunk(2)
        d = (pred_p - pred_c).norm()
        loss = -lam * torch.exp(-d / sigma)
        (grad,) = torch.autograd.grad(loss, xg)
    steered = c * (x_in - eta * grad)
    guided = pred_0 + SCALE * (pred_p.detach() - pred_c.detach())
    return scheduler.step(guided, t, steered, return_dict=False)[0]


def _literal_sdxl(pipe, prompt, concept, latents, lam, eta, sigma):
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    e_p, _, pooled_p, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    e_c, _, pooled_c, _ = pipe.encode_prompt(concept, device="cpu", do_classifier_free_guidance=False)
    e_0, pooled_0 = torch.zeros_like(e_p), torch.zeros_like(pooled_p)  # force_zeros_for_empty_prompt
    time_ids = pipe._get_add_time_ids((HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH), dtype=e_p.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)

    def unet(x_in, embeds, pooled):
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(x_in), 1)}
        return pipe.unet(x_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    c = float(scheduler.sigmas[0] ** 2 + 1) ** 0.5
    x = latents * scheduler.init_noise_sigma
    return _steer_literally(unet, x, scheduler, t, (e_0, pooled_0),
                            (torch.cat([e_p, e_c]), torch.cat([pooled_p, pooled_c])), lam, eta, sigma, c)


def _literal_sd3(pipe, prompt, concept, latents, lam, eta, sigma):
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    encoded = [pipe.encode_prompt(text, text, text, device="cpu", do_classifier_free_guidance=False)
               for text in ("", prompt, concept)]
    (e_0, _, pooled_0, _), (e_p, _, pooled_p, _), (e_c, _, pooled_c, _) = encoded

    def transformer(x, embeds, pooled):
        return pipe.transformer(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=embeds,
                                pooled_projections=pooled).sample

    return _steer_literally(transformer, latents, scheduler, t, (e_0, pooled_0),
                            (torch.cat([e_p, e_c]), torch.cat([pooled_p, pooled_c])), lam, eta, sigma)


def _literal_flux(pipe, prompt, concept, latents, lam, eta, sigma):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    b, c, h, w = latents.shape
    packed = _pack(pipe, latents)  # diffusers' own layout, (B, h/2 * w/2, 4C)
    scheduler = copy.deepcopy(pipe.scheduler)
    mu = calculate_shift(packed.shape[1], 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    t = scheduler.timesteps[0]
    image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", packed.dtype)
    (e_0, pooled_0, text_ids), (e_p, pooled_p, _), (e_c, pooled_c, _) = [
        pipe.encode_prompt(text, None, device="cpu") for text in ("", prompt, concept)]

    def transformer(x, embeds, pooled):
        return pipe.transformer(hidden_states=x, timestep=t.expand(len(x)) / 1000, guidance=torch.full((len(x),), 3.5),
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=image_ids).sample

    stepped = _steer_literally(transformer, packed, scheduler, t, (e_0, pooled_0),
                               (torch.cat([e_p, e_c]), torch.cat([pooled_p, pooled_c])), lam, eta, sigma)
    return pipe._unpack_latents(stepped, HEIGHT, WIDTH, pipe.vae_scale_factor)


LITERAL = {"sdxl": _literal_sdxl, "sd3": _literal_sd3, "flux": _literal_flux}


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_matches_literal_transcription_and_steering_moves(pipes, family):
    pipe = pipes[family]
    prompt, concept, settings = "a red apple", "an apple", STEER[family]
    latents = _latents(pipe)
    steps = []
    out = _ours(pipe, prompt, latents, callback=steps.append, concept=concept, **settings)
    expected = LITERAL[family](pipe, prompt, concept, latents, settings["loss_scale"], settings["step_size"],
                               settings["sigma"])
    first = steps[0].latents
    assert torch.allclose(first, expected, atol=1e-4), (first - expected).abs().max()

    # the steering must have done something measurable, or the comparison proves little
    unsteered_steps = []
    unsteered = _ours(pipe, prompt, latents, callback=unsteered_steps.append, concept=concept,
                      **{**settings, "loss_scale": 0.0})
    assert (unsteered_steps[0].latents - first).abs().max() > 1e-2
    assert (unsteered.images - out.images).abs().max() > 1e-2
    assert out.steered_steps.tolist() == [STEPS]
    assert 0.05 < out.max_kernel.item() <= 1.0


def test_unsupported_pipeline_lists_the_supported_ones():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(TypeError, match="DDPMPipeline is not supported; trasce supports: StableDiffusionPipeline, "
                                        "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline") as error:
        TraSCEPipeline.from_pipe(pipe, concept="x")
    assert "FLUX.1-schnell, SDXL-Turbo, LCM" in str(error.value)


@pytest.mark.parametrize(("family", "label", "guidance", "steps"),
                         [("sdxl", "SDXL", 5.0, 50), ("sd3", "SD3", 7.0, 28), ("flux", "FLUX", 3.5, 28)])
def test_steps_and_cfg_left_out_are_the_family_pipelines(pipes, tmp_path, family, label, guidance, steps):
    from trasce.cli import CFG_DEFAULTS
    from trasce.pipeline import model_call_defaults

    pipes[family].save_pretrained(tmp_path / family)  # known from its model_index.json, before loading
    assert model_call_defaults(tmp_path / family) == {"guidance_scale": guidance, "steps": steps}
    assert TraSCEPipeline.from_pipe(pipes[family], concept="x").call_defaults == {"guidance_scale": guidance,
                                                                                   "steps": steps}
    assert f"{guidance:g} for {label}" in CFG_DEFAULTS  # what the commands' --help says


def test_a_call_without_steps_and_cfg_runs_the_defaults(pipes):
    pipe = pipes["flux"]  # true CFG 3.5, where FluxPipeline's own guidance_scale is another thing
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple", mode="negation")
    seen = []
    latents = _latents(pipe)
    left_out = trasce(["a red apple"], latents=latents.clone(), height=HEIGHT, width=WIDTH, output_type="latent",
                      callback=seen.append).images
    given = trasce(["a red apple"], num_inference_steps=28, guidance_scale=3.5, latents=latents.clone(),
                   height=HEIGHT, width=WIDTH, output_type="latent").images
    assert len(seen) == 28 and torch.equal(left_out, given)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_runs_a_flow_matching_folder(pipes, tmp_path, family):
    # their schedulers shift the timesteps by the image size: the check of --steps must set them as the family does
    import json

    from click.testing import CliRunner

    from trasce.cli import main

    pipes[family].save_pretrained(tmp_path / family)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / family), "--prompt", "a red apple",
                                       "--concept", "an apple", "--steps", "2", "--height", "64", "--width", "64",
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines()] == [
        "images/00000.png"]
    assert (out / "images" / "00000.png").is_file()


def test_generate_refuses_a_size_the_family_cannot_make_before_recording_the_run(pipes, tmp_path):
    from click.testing import CliRunner

    from trasce.cli import main

    pipes["sd3"].save_pretrained(tmp_path / "sd3")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "sd3"), "--prompt", "a red apple",
                                       "--concept", "an apple", "--steps", "2", "--height", "72", "--width", "64",
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "height and width must be multiples of 16 for Stable Diffusion 3; got 72x64" in result.output
    assert not (out / "run.json").exists()


def test_from_pretrained_picks_the_adapter(pipes, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    pipes["sd3"].save_pretrained(tmp_path / "sd3")
    given = []
    load = DiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: given.append(kwargs) or load(cls, *args, **kwargs)))
    trasce = TraSCEPipeline.from_pretrained(tmp_path / "sd3", concept="an apple")
    assert type(trasce.adapter) is StableDiffusion3Adapter
    assert type(trasce.pipe).__name__ == "StableDiffusion3Pipeline"
    assert given and "safety_checker" not in given[-1]  # no part passed that SD3's pipeline does not take


@pytest.mark.parametrize(("arch", "family"), [("tiny-sd", "Stable Diffusion 1.x/2.x"),
                                              ("tiny-sdxl", "Stable Diffusion XL")])
def test_an_lcm_distilled_unet_is_refused(arch, family):
    from diffusers import UNet2DConditionModel

    from trasce.models.random import build

    pipe = build(arch)
    lcm = UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=8)
    with pytest.raises(ValueError, match=rf"^this {re.escape(family)} denoiser embeds the guidance scale "
                                         r"\(time_cond_proj_dim=8: an LCM-distilled model\); it runs without "
                                         r"classifier-free guidance"):
        TraSCEPipeline.from_pipe(type(pipe)(**{**pipe.components, "unet": lcm}), concept="x")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_discrete_schedulers_are_refused_for_flow_matching_models(pipes, family):
    from trasce.pipeline import set_scheduler

    before = pipes[family].scheduler
    with pytest.raises(ValueError, match=r"^scheduler 'ddim' is for noise- and velocity-predicting models .* "
                                         r"FlowMatchEulerDiscreteScheduler is flow matching"):
        set_scheduler(pipes[family], "ddim")
    assert pipes[family].scheduler is before


def test_real_size_architectures_have_their_published_sizes():
    """The real-size configs (built on the meta device: no memory, no weights) match the models."""
    def billions(module):
        return sum(p.numel() for p in module.parameters()) / 1e9

    sdxl, sd3, flux = (build(arch, dtype=torch.bfloat16, device="meta") for arch in ("sdxl", "sd3", "flux"))
    assert 2.5 < billions(sdxl.unet) < 2.6  # SDXL base UNet: 2.57B
    assert 1.9 < billions(sd3.transformer) < 2.1  # SD3-medium MMDiT: 2B
    assert 11.8 < billions(flux.transformer) < 12.0  # FLUX.1-dev: 12B
    assert 4.7 < billions(flux.text_encoder_2) < 4.8  # T5-XXL encoder: 4.76B
    for pipe, latent in ((sdxl, (4, 128, 128)), (sd3, (16, 128, 128)), (flux, (16, 128, 128))):
        adapter = adapter_for(pipe)
        assert adapter.default_size() == (1024, 1024)
        assert adapter.latent_shape(1024, 1024) == latent


def test_sd14_narrow_has_sd14_topology():
    """``sd14-narrow`` (for counting SD v1.4's operator calls cheaply) differs from ``sd14`` in widths only."""
    sd14, narrow = (build(arch, device="meta") for arch in ("sd14", "sd14-narrow"))
    assert 0.85 < sum(p.numel() for p in sd14.unet.parameters()) / 1e9 < 0.87  # SD v1.4 UNet: 860M

    def topology(pipe):
        modules = [*pipe.unet.named_modules(), *pipe.text_encoder.named_modules(), *pipe.vae.named_modules()]
        return [(name, type(m).__name__, getattr(m, "heads", None), getattr(m, "num_heads", None))
                for name, m in modules]

    assert topology(narrow) == topology(sd14)
    assert narrow.unet.config.block_out_channels == (32, 64, 128, 128)
    # every other setting (attention upcasting, projections, norms...) is sd14's
    widths = {"block_out_channels", "cross_attention_dim", "hidden_size", "intermediate_size", "projection_dim"}
    for a, b in ((sd14.unet.config, narrow.unet.config), (sd14.vae.config, narrow.vae.config),
                 (sd14.text_encoder.config.to_dict(), narrow.text_encoder.config.to_dict())):
        assert {k: v for k, v in a.items() if k not in widths} == {k: v for k, v in b.items() if k not in widths}
