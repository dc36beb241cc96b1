"""The sampler against the literal released loop and against diffusers' own pipeline."""

import pytest
import torch
from conftest import make_tiny_sd

from trasce import TraSCEPipeline
from trasce.reference import released_loop
from trasce.sampler import DEFAULT_LAZY_TOLERANCE

STEPS = 6


def _latents(pipe, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g)


def _embed(pipe, text):
    return pipe.encode_prompt([text], "cpu", 1, do_classifier_free_guidance=False)[0]


@pytest.mark.parametrize("mode", ["trasce", "negation"])
def test_matches_literal_released_loop(tiny_sd, mode):
    pipe = tiny_sd
    prompt, concept = "a red apple", "an apple"
    lam, eta, sigma, scale = 3.0, 2.0, 20.0, 7.5
    latents = _latents(pipe)
    reference = released_loop(pipe.unet, pipe.scheduler, latents.clone(), _embed(pipe, ""), _embed(pipe, prompt),
                              _embed(pipe, concept), STEPS, scale, lam if mode == "trasce" else 0.0, eta, sigma)
    trasce = TraSCEPipeline.from_pipe(pipe, concept=concept, mode=mode, loss_scale=lam, step_size=eta, sigma=sigma,
                                      lazy_tolerance=None)
    ours = trasce(prompt, num_inference_steps=STEPS, guidance_scale=scale, latents=latents.clone(),
                  output_type="latent")
    assert torch.allclose(ours.images, reference, atol=1e-4), (ours.images - reference).abs().max()
    # the default (lazy) path skips nothing here, where every step's update is large
    lazy = trasce.with_settings(lazy_tolerance=DEFAULT_LAZY_TOLERANCE)(
        prompt, num_inference_steps=STEPS, guidance_scale=scale, latents=latents.clone(), output_type="latent")
    assert torch.allclose(lazy.images, reference, atol=1e-4)
    if mode == "trasce":
        # the steering must have done something measurable, or the comparison proves little
        unsteered = released_loop(pipe.unet, pipe.scheduler, latents.clone(), _embed(pipe, ""),
                                  _embed(pipe, prompt), _embed(pipe, concept), STEPS, scale, 0.0, eta, sigma)
        assert (reference - unsteered).abs().max() > 1e-2
        assert ours.steered_steps.tolist() == [STEPS]
        assert 0.05 < ours.max_kernel.item() <= 1.0


@pytest.mark.parametrize("mode", ["none", "negative_prompt"])
def test_matches_diffusers_pipeline(tiny_sd, mode):
    pipe = tiny_sd
    prompts, concept = ["a red apple", "a blue car"], "an apple"
    latents = _latents(pipe, batch=2)
    negative = None if mode == "none" else [concept] * 2
    expected = pipe(prompts, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents.clone(),
                    negative_prompt=negative, output_type="latent").images
    ours = TraSCEPipeline.from_pipe(pipe, concept=concept, mode=mode)(
        prompts, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents.clone(), output_type="latent")
    assert torch.allclose(ours.images, expected, atol=1e-4), (ours.images - expected).abs().max()


def test_batch_equals_one_at_a_time(tiny_sd):
    """Three prompts with their own seeds and scales, batched, equal the same three run alone."""
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0)
    prompts, seeds, scales = ["a red apple", "a blue car", "an apple"], [1, 2, 3], [7.5, 3.0, 5.0]
    batched = trasce(prompts, num_inference_steps=STEPS, guidance_scale=scales, output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    for i in range(3):
        alone = trasce(prompts[i], num_inference_steps=STEPS, guidance_scale=scales[i], output_type="latent",
                       generator=[torch.Generator().manual_seed(seeds[i])]).images
        assert torch.allclose(batched[i : i + 1], alone, atol=1e-4), i


@pytest.mark.parametrize("scheduler", ["dpm++", "euler"])
def test_other_schedulers_run_and_steer(tmp_path, scheduler):
    from trasce.pipeline import set_scheduler

    pipe = make_tiny_sd(tmp_path)
    set_scheduler(pipe, scheduler)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", latents=_latents(pipe))
    steered = TraSCEPipeline.from_pipe(pipe, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0)
    out = steered("a red apple", **kwargs).images
    plain = steered.with_settings(loss_scale=0.0)("a red apple", **kwargs).images
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3
    # with erasure off, the scheduler path must still equal diffusers' own
    expected = pipe("a red apple", guidance_scale=7.5, **kwargs).images
    none = TraSCEPipeline.from_pipe(pipe, mode="none")("a red apple", **kwargs).images
    assert torch.allclose(none, expected, atol=1e-4)


def test_v_prediction_distance_uses_noise_equivalent(tmp_path):
    """For v-prediction, d must be ||eps_p - eps_c|| = sqrt(alpha_bar_t) * ||v_p - v_c||."""
    pipe = make_tiny_sd(tmp_path, prediction_type="v_prediction")
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple", mode="negation")
    seen = []
    trasce("a red apple", num_inference_steps=2, latents=_latents(pipe), output_type="latent",
           callback=lambda step: seen.append((step.timestep, step.distance)))
    pipe.scheduler.set_timesteps(2)
    x = _latents(pipe) * pipe.scheduler.init_noise_sigma
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        v = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat(
            [_embed(pipe, "a red apple"), _embed(pipe, "an apple")])).sample
    expected = pipe.scheduler.alphas_cumprod[int(t)].sqrt() * (v[0] - v[1]).norm()
    assert seen[0][0] == t
    assert torch.allclose(seen[0][1], expected.reshape(1), rtol=1e-4)


def test_pixel_space_model_without_vae(tmp_path):
    pipe = make_tiny_sd(tmp_path, vae=False, sample_size=16)
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0)
    out = trasce(["a red apple", "a car"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="np")
    assert out.images.shape == (2, 16, 16, 3)
    pil = trasce("a car", num_inference_steps=2, output_type="pil").images
    assert pil[0].size == (16, 16)


def test_lazy_with_zero_tolerance_is_exact_and_large_tolerance_skips(tiny_sd):
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", latents=_latents(tiny_sd, batch=2))
    prompts = ["a red apple", "a blue car"]
    exact = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                     lazy_tolerance=None)
    reference = exact(prompts, **kwargs)
    zero = exact.with_settings(lazy_tolerance=0.0)(prompts, **kwargs)
    assert torch.allclose(zero.images, reference.images, atol=1e-5)
    assert zero.steered_steps.tolist() == [STEPS, STEPS]
    skipping = exact.with_settings(lazy_tolerance=1e9)(prompts, **kwargs)
    # the first steered step measures ||dd/dx||; after it, nothing is worth a backward pass
    assert skipping.steered_steps.tolist() == [1, 1]
    assert torch.allclose(skipping.images, exact.with_settings(steer_window=(0.0, 1 / STEPS))(prompts, **kwargs)
                          .images, atol=1e-5)


def _refresh_transcription(pipe, latents, prompt, concept, scale, lam, eta, sigma, refresh):
    """By hand: TraSCE at step 0, then part 1 alone with the concept branch evaluated every ``refresh``
    steps and ``pred_c - pred_0`` reused in between (what a far image gets under ``concept_refresh``)."""
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    x = latents * sched.init_noise_sigma
    e0, ep, ec = _embed(pipe, ""), _embed(pipe, prompt), _embed(pipe, concept)
    delta = None
    for i, t in enumerate(sched.timesteps):
        if i == 0:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                p0, pp, pc = pipe.unet(torch.cat([x] * 3), t, encoder_hidden_states=torch.cat([e0, ep, ec])).sample\
                    .chunk(3)
                loss = -lam * torch.exp(-torch.norm(pp - pc) / sigma)
                (grad,) = torch.autograd.grad(loss, x)
            x, p0, pp, pc = (x - eta * grad).detach(), p0.detach(), pp.detach(), pc.detach()
        elif i % refresh == 0:
            p0, pp, pc = pipe.unet(torch.cat([x] * 3), t, encoder_hidden_states=torch.cat([e0, ep, ec])).sample.chunk(3)
        else:
            p0, pp = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=torch.cat([e0, ep])).sample.chunk(2)
            pc = p0 + delta
        if i % refresh == 0:
            delta = pc - p0
        x = sched.step(p0 + scale * (pp - pc), t, x).prev_sample
    return x


@torch.no_grad()
def test_concept_refresh_reuses_the_concept_direction_of_far_images(tiny_sd):
    prompt, concept, scale, lam, eta, sigma = "a blue car", "an apple", 7.5, 3.0, 2.0, 20.0
    latents = _latents(tiny_sd)
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept=concept, loss_scale=lam, step_size=eta, sigma=sigma,
                                      lazy_tolerance=1e9, concept_refresh=3)
    batches = []
    unet_forward = tiny_sd.unet.forward

    def counting(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return unet_forward(sample, *args, **kwargs)

    tiny_sd.unet.forward = counting
    try:
        ours = trasce(prompt, num_inference_steps=STEPS, guidance_scale=scale, latents=latents.clone(),
                      output_type="latent")
    finally:
        del tiny_sd.unet.forward
    # step 0: branch 0, then prompt and concept with gradients; concept branch again at steps 3 only
    assert batches == [1, 2, 2, 2, 3, 2, 2]
    expected = _refresh_transcription(tiny_sd, latents.clone(), prompt, concept, scale, lam, eta, sigma, 3)
    assert torch.allclose(ours.images, expected, atol=1e-4), (ours.images - expected).abs().max()
    every_step = trasce.with_settings(concept_refresh=1)(prompt, num_inference_steps=STEPS, guidance_scale=scale,
                                                         latents=latents.clone(), output_type="latent")
    assert (every_step.images - ours.images).abs().max() > 1e-3  # the reuse is an approximation
    # an image that needs its backward pass every step is never approximated
    hot = trasce.with_settings(lazy_tolerance=0.0)
    assert torch.equal(hot(prompt, num_inference_steps=STEPS, latents=latents.clone(), output_type="latent").images,
                       hot.with_settings(concept_refresh=1)(prompt, num_inference_steps=STEPS,
                                                            latents=latents.clone(), output_type="latent").images)
    with pytest.raises(ValueError, match="concept_refresh must be a whole number of steps >= 1, got 0"):
        trasce.with_settings(concept_refresh=0)


def test_bad_arguments(tiny_sd):
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")
    with pytest.raises(ValueError, match="multiples of 8; got 60x64"):
        trasce("a car", height=60, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale has 3 values for 2 prompts"):
        trasce(["a", "b"], guidance_scale=[1, 2, 3], num_inference_steps=1)
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        trasce(["a", "b"], generator=[torch.Generator()], num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown mode 'erase'"):
        TraSCEPipeline.from_pipe(tiny_sd, concept="x", mode="erase")
    with pytest.raises(ValueError, match="preset 'style' needs the concept named"):
        TraSCEPipeline.from_pipe(tiny_sd, preset="style")
    with pytest.raises(TypeError, match="is not supported; trasce supports: StableDiffusionPipeline"):
        TraSCEPipeline.from_pipe(object(), concept="x")
