"""The sampler against the literal released loop and against diffusers' own pipeline."""

import copy
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import flag_by_position, make_tiny_sd, with_safety_checker

from trasce import TraSCEPipeline
from trasce.pipeline import NonFiniteImageWarning
from trasce.reference import released_loop
from trasce.sampler import DEFAULT_LAZY_TOLERANCE, CompiledGradientError, EraseSettings, GradientCheck, sample

STEPS = 6


def _latents(pipe, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g)


def _exact_two_images(pipe):
    """An exact pipeline on ``pipe`` that steers hard, two prompts, and the arguments of their call."""
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                      lazy_tolerance=None)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", latents=_latents(pipe, batch=2))
    return trasce, ["a red apple", "a blue car"], kwargs


def _embed(pipe, text):
    return pipe.encode_prompt([text], "cpu", 1, do_classifier_free_guidance=False)[0]


@pytest.mark.parametrize(("mode", "one_call"), [("trasce", False), ("trasce", True), ("negation", False)])
def test_matches_literal_released_loop(tiny_sd, mode, one_call):
    pipe = tiny_sd
    prompt, concept = "a red apple", "an apple"
    lam, eta, sigma, scale = 3.0, 2.0, 20.0, 7.5
    latents = _latents(pipe)
    reference = released_loop(pipe.unet, pipe.scheduler, latents.clone(), _embed(pipe, ""), _embed(pipe, prompt),
                              _embed(pipe, concept), STEPS, scale, lam if mode == "trasce" else 0.0, eta, sigma)
    trasce = TraSCEPipeline.from_pipe(pipe, concept=concept, mode=mode, loss_scale=lam, step_size=eta, sigma=sigma,
                                      lazy_tolerance=None).with_settings(one_call=one_call)
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
    # decoded too, through the VAE and the image processor
    expected_np = pipe(prompts, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents.clone(),
                       negative_prompt=negative, output_type="np").images
    ours_np = TraSCEPipeline.from_pipe(pipe, concept=concept, mode=mode)(
        prompts, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents.clone(), output_type="np").images
    assert ours_np.shape == expected_np.shape == (2, 64, 64, 3) and abs(ours_np - expected_np).max() < 1e-4
    assert expected_np.std() > 0.01  # an image, not a constant


@pytest.mark.parametrize("scales", [[0.5, 7.5], [0.5, 0.5], [1.0, 0.9]])
@pytest.mark.parametrize("mode", ["none", "negative_prompt"])
def test_scales_of_one_or_less_switch_guidance_off_as_in_diffusers(tiny_sd, mode, scales):
    """diffusers takes the prompt's prediction alone at a scale of 1 or less, per image here
    (a batch of two scales) and for a scale the batch shares."""
    pipe = tiny_sd
    prompts, concept = ["a red apple", "a blue car"], "an apple"
    latents = _latents(pipe, batch=2)
    ours = TraSCEPipeline.from_pipe(pipe, concept=concept, mode=mode)(
        prompts, num_inference_steps=STEPS, guidance_scale=scales, latents=latents.clone(), output_type="latent")
    for i, scale in enumerate(scales):
        expected = pipe(prompts[i], num_inference_steps=STEPS, guidance_scale=scale, latents=latents[i : i + 1].clone(),
                        negative_prompt=None if mode == "none" else concept, output_type="latent").images
        assert torch.allclose(ours.images[i : i + 1], expected, atol=1e-4), (i, (ours.images[i] - expected).abs().max())


@pytest.mark.parametrize("flags_every_image", [True, False])
def test_a_wrapped_pipelines_safety_checker_runs_as_in_diffusers(tiny_sd, flags_every_image):
    pipe = with_safety_checker(tiny_sd, flags_every_image)
    latents = _latents(pipe, batch=2)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    expected = pipe(["a red apple", "a blue car"], latents=latents.clone(), **kwargs)
    for mode in ("none", "trasce"):
        ours = TraSCEPipeline.from_pipe(pipe, concept="an apple", mode=mode)(["a red apple", "a blue car"],
                                                                            latents=latents.clone(), **kwargs)
        assert ours.nsfw_content_detected == expected.nsfw_content_detected == [flags_every_image] * 2
        assert ours.stats(1)["nsfw_content_detected"] is flags_every_image
        assert bool(ours.images.max() == 0) is flags_every_image  # flagged images are black
        if mode == "none":
            assert abs(ours.images - expected.images).max() < 1e-4
    # no checker, no flags
    assert TraSCEPipeline.from_pipe(tiny_sd, mode="none")("a red apple", **kwargs).nsfw_content_detected is None


def test_the_safety_checkers_flags_stay_with_their_images(tiny_sd):
    """A batch where only the second and third images are flagged: each flag and black image in its place,
    for TraSCE and for SLD (trasce benchmark's runner, one SLD call per CFG scale)."""
    from trasce.benchmark import method_runner

    pipe = with_safety_checker(tiny_sd, flags_every_image=False)
    latents = _latents(pipe, batch=3)
    prompts, scales = ["a red apple", "a blue car", "a green tree"], [7.5, 3.0, 7.5]
    flag_by_position(pipe, lambda i: i in (1, 2))  # the call's positions: SLD's first call holds images 0 and 2
    expected = pipe(prompts[:2], num_inference_steps=STEPS, guidance_scale=7.5, latents=latents[:2].clone(),
                    output_type="np")
    ours = TraSCEPipeline.from_pipe(pipe, concept="an apple", mode="none")(
        prompts[:2], num_inference_steps=STEPS, guidance_scale=7.5, latents=latents[:2].clone(), output_type="np")
    assert ours.nsfw_content_detected == expected.nsfw_content_detected == [False, True]
    assert ours.images[0].max() > 0 and ours.images[1].max() == 0
    assert abs(ours.images - expected.images).max() < 1e-4

    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple")
    runner = method_runner("sld-max", trasce, "an apple", 64, 64)
    images, stats = runner(prompts, latents, [torch.Generator().manual_seed(i) for i in range(3)], scales, STEPS)
    # SLD's call at 7.5 holds images 0 and 2 (positions 0 and 1: 2 is flagged); its call at 3.0 holds image 1 alone
    assert [s.get("nsfw_content_detected") for s in stats] == [False, False, True]
    assert [bool(np.asarray(image).max() == 0) for image in images] == [False, False, True]


def test_generators_may_come_as_a_tuple(tiny_sd):
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent")
    as_list = trasce(["a red apple", "a blue car"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                     **kwargs).images
    as_tuple = trasce(["a red apple", "a blue car"], generator=tuple(torch.Generator().manual_seed(s) for s in (1, 2)),
                      **kwargs).images
    assert torch.equal(as_list, as_tuple)


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


def _second_pndm_step(sample_at_step_1: torch.Tensor, scheduler_class: str) -> torch.Tensor:
    """Two steps of a fresh scheduler with fixed predictions; only the second step's sample varies."""
    import diffusers

    cls = getattr(diffusers, scheduler_class)
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                    steps_offset=1, **({"skip_prk_steps": True} if scheduler_class == "PNDMScheduler" else
                                       {"clip_sample": False}))
    scheduler.set_timesteps(STEPS)
    noise = torch.ones(1, 4, 8, 8)
    t0, t1 = scheduler.timesteps[:2]
    scheduler.step(noise, t0, torch.zeros(1, 4, 8, 8))
    return scheduler.step(noise, t1, sample_at_step_1).prev_sample


def test_pndm_is_refused_where_it_would_lose_the_steering_update(tmp_path):
    # Why: PNDM's second step continues from the sample it stored at the first, whatever it is given.
    moved = torch.full((1, 4, 8, 8), 0.5)
    assert torch.equal(_second_pndm_step(torch.zeros(1, 4, 8, 8), "PNDMScheduler"),
                       _second_pndm_step(moved, "PNDMScheduler"))
    assert not torch.equal(_second_pndm_step(torch.zeros(1, 4, 8, 8), "DDIMScheduler"),
                           _second_pndm_step(moved, "DDIMScheduler"))

    from diffusers import PNDMScheduler

    pipe = make_tiny_sd(tmp_path)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple")
    kwargs = dict(num_inference_steps=2, output_type="latent", latents=_latents(pipe))
    with pytest.raises(ValueError, match=r"^PNDMScheduler is not among the schedulers known to step from the "
                                         r"latent they are given \(DDIMScheduler, .*\); .*--scheduler ddim"):
        trasce("a red apple", **kwargs)
    # modes that do not steer, or a window without steps, have nothing to lose
    for settings in ({"mode": "negation"}, {"mode": "none"}, {"mode": "negative_prompt"}, {"steer_window": (1, 1)}):
        assert torch.isfinite(trasce.with_settings(**settings)("a red apple", **kwargs).images).all()
    from diffusers import UniPCMultistepScheduler  # its corrector rebuilds the sample from the previous one

    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"^UniPCMultistepScheduler is not among the schedulers known"):
        trasce("a red apple", **kwargs)


def test_from_pretrained_replaces_pndm_by_ddim_unless_named(tmp_path):
    from diffusers import PNDMScheduler

    pipe = make_tiny_sd(tmp_path)
    config = {key: value for key, value in pipe.scheduler.config.items() if key != "clip_sample"}
    pipe.scheduler = PNDMScheduler.from_config(config, skip_prk_steps=True)  # as SD v1.4 ships it
    pipe.save_pretrained(tmp_path / "sd")
    for mode in ("trasce", "none"):
        loaded = TraSCEPipeline.from_pretrained(tmp_path / "sd", concept="an apple", mode=mode).pipe.scheduler
        assert type(loaded).__name__ == "DDIMScheduler"
        assert loaded.config.clip_sample is False  # a latent model: DDIM's default (True) would clip latents
        assert loaded.config.steps_offset == 1 and loaded.config.beta_schedule == "scaled_linear"
    named = TraSCEPipeline.from_pretrained(tmp_path / "sd", mode="none", scheduler="pndm").pipe.scheduler
    assert type(named).__name__ == "PNDMScheduler"
    from trasce.bench import load_for_bench  # trasce bench loads real models too

    assert type(load_for_bench(str(tmp_path / "sd"), torch.float32, torch.device("cpu")).scheduler).__name__ == \
        "DDIMScheduler"


def test_pndm_named_for_a_ddim_model_is_pndm_as_sd_ships_it(tiny_sd):
    # PLMS steps only (skip_prk_steps): without it, fewer than 4 steps fail and 4 run as 13
    from diffusers import PNDMScheduler

    from trasce.pipeline import set_scheduler

    set_scheduler(tiny_sd, "pndm")
    shipped = PNDMScheduler.from_config(tiny_sd.scheduler.config, skip_prk_steps=True)
    for scheduler in (tiny_sd.scheduler, shipped):
        scheduler.set_timesteps(2)
    assert tiny_sd.scheduler.config.skip_prk_steps and torch.equal(tiny_sd.scheduler.timesteps, shipped.timesteps)


def test_negative_prompt_mode_reports_the_distance_to_the_concept(tiny_sd):
    """Its concept branch gives d at every step; at the first step it equals part 1's (same x_T, same branches)."""
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")
    first = {}
    for mode in ("negation", "negative_prompt"):
        out = trasce.with_settings(mode=mode)(
            ["a red apple", "a blue car"], num_inference_steps=2, output_type="latent",
            latents=_latents(tiny_sd, batch=2), callback=lambda step, mode=mode: first.setdefault(mode, step.distance))
        assert out.min_distance is not None and out.max_kernel is not None and out.steered_steps is None
    assert torch.allclose(first["negative_prompt"], first["negation"]) and (first["negation"] > 0).all()


def test_v_prediction_noise_scale_follows_the_step_sigma_where_timesteps_are_fractional():
    """With Karras sigmas Euler's timesteps are fractional, and sqrt(alpha_bar) is 1 / sqrt(1 + sigma**2)
    at the step's own sigma, not the table's entry at int(t) (0.1094 for 0.1092 at step 1 here)."""
    from diffusers import EulerDiscreteScheduler

    from trasce.sampler import noise_scale

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[1] != int(scheduler.timesteps[1])
    for i, t in enumerate(scheduler.timesteps):
        expected = float((1 + scheduler.sigmas[i].double() ** 2) ** -0.5)
        assert noise_scale(scheduler, t) == pytest.approx(expected, rel=1e-6), i
        scheduler._step_index += 1  # as scheduler.step would


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
    exact, prompts, kwargs = _exact_two_images(tiny_sd)
    reference = exact(prompts, **kwargs)
    zero = exact.with_settings(lazy_tolerance=0.0)(prompts, **kwargs)
    assert torch.allclose(zero.images, reference.images, atol=1e-5)
    assert zero.steered_steps.tolist() == [STEPS, STEPS]
    skipping = exact.with_settings(lazy_tolerance=1e9)(prompts, **kwargs)
    # the first steered step measures ||dd/dx||; after it, nothing is worth a backward pass
    assert skipping.steered_steps.tolist() == [1, 1]
    assert torch.allclose(skipping.images, exact.with_settings(steer_window=(0.0, 1 / STEPS))(prompts, **kwargs)
                          .images, atol=1e-5)


def _record_updates(monkeypatch) -> list[torch.Tensor]:
    """Each steered step's update sizes (RMS per element of ``eta * grad``, per image), as they happen."""
    import trasce.sampler as sampler

    updates, steer = [], sampler.guidance.steer

    def recording_steer(latents, grad, step_size):
        updates.append((step_size * grad).flatten(1).pow(2).mean(1).sqrt())
        return steer(latents, grad, step_size)

    monkeypatch.setattr(sampler.guidance, "steer", recording_steer)
    return updates


def _replay_lazy_steps(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per lazy step: the update each image would get on the exact path from the same latent (RMS per
    element; DDIM's x_in is the latent), and which images the lazy path steered."""
    import trasce.sampler as sampler

    replayed, steering_step = [], sampler._steering_step

    def replaying_step(denoise, scheduler, latents, t, *args):
        settings, estimate, step = args[3], args[6], args[8]
        if settings.lazy_tolerance is not None:
            exact_args = (*args[:3], replace(settings, lazy_tolerance=None), *args[4:6], copy.deepcopy(estimate),
                          args[7], sampler.Step(index=step.index, timestep=t, latents=latents), None)
            _, steered, _ = steering_step(denoise, scheduler, latents, t, *exact_args)
        preds, lazy_steered, step = steering_step(denoise, scheduler, latents, t, *args)
        if settings.lazy_tolerance is not None:
            replayed.append(((steered - latents).flatten(1).pow(2).mean(1).sqrt(), step.steered.clone()))
        return preds, lazy_steered, step

    monkeypatch.setattr(sampler, "_steering_step", replaying_step)
    return replayed


@pytest.mark.parametrize("sign", [(1.0, 1.0), (-1.0, 1.0), (1.0, -1.0)])
def test_lazy_skips_only_updates_below_its_tolerance_whichever_way_they_push(tiny_sd, monkeypatch, sign):
    """A negative lambda or eta moves the latent away from where the branches agree. Whichever the
    direction, every update that lazy steering skips must be smaller than its tolerance, here the
    median of the exact run's updates. On this model ||dd/dx|| shrinks over the run, so a correct
    estimate skips nothing; an earlier version kept the sign of lambda * eta in its update sizes and
    bounds, and skipped every step after the first when eta < 0, updates 4 times the tolerance
    among them (test_guidance holds update_bound alone; the next test makes the estimate skip)."""
    exact, prompts, kwargs = _exact_two_images(tiny_sd)
    signed = exact.with_settings(loss_scale=sign[0] * exact.settings.loss_scale,
                                 step_size=sign[1] * exact.settings.step_size)
    updates = _record_updates(monkeypatch)
    reference = signed(prompts, **kwargs)
    if sign != (1.0, 1.0):
        assert not torch.allclose(reference.images, exact(prompts, **kwargs).images, atol=1e-3)
    tolerance = float(torch.stack(updates).median())
    replayed = _replay_lazy_steps(monkeypatch)
    signed.with_settings(lazy_tolerance=tolerance)(prompts, **kwargs)
    assert len(replayed) == STEPS
    for sizes, steered in replayed:
        assert (sizes[~steered] < tolerance).all(), (sizes, steered, tolerance)


@pytest.mark.parametrize("growth", [1.5, 1.0])
def test_lazy_estimate_keeps_up_with_a_gradient_that_grows(monkeypatch, growth):
    """The prompt branch differs from the others by 1.4**i * (W x + b) at step i, so ||dd/dx|| grows
    1.4-fold per step, and with a flat kernel so does the update. With the tolerance at step 4's
    update, the running maximum alone (growth 1: the estimate x2) skips step 5's update, above the
    tolerance; the default growth (x1.5 per step since the last measurement) keeps up."""
    from diffusers import DDIMScheduler

    import trasce.sampler as sampler

    monkeypatch.setattr(sampler._GradientNormEstimate, "growth", growth)
    g = torch.Generator().manual_seed(0)
    n = 4 * 8 * 8
    w, b = 0.05 * torch.randn(n, n, generator=g) / n**0.5, 0.2 * torch.randn(n, generator=g)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    index = {int(t): i for i, t in enumerate(scheduler.timesteps)}

    def denoise(x_in, t, cond):
        flat = x_in.flatten(1).float()
        prompt = (cond["branch"] == 1).float()[:, None]
        return (0.1 * flat + prompt * 1.4 ** index[int(t)] * (flat @ w.T + b)).reshape(x_in.shape)

    conds = [{"branch": torch.tensor([float(k)])} for k in range(3)]
    x = torch.randn(1, 4, 8, 8, generator=g)
    settings = EraseSettings(loss_scale=1.0, step_size=1.0, sigma=1e4, lazy_tolerance=None)  # a flat kernel
    updates = _record_updates(monkeypatch)
    list(sample(denoise, scheduler, x, *conds, 1.0, settings, 10, timesteps_set=True))
    sizes = torch.stack(updates).flatten()
    assert (sizes[1:] / sizes[:-1] > 1.3).all()  # the updates grow step by step
    tolerance = float(sizes[4])
    replayed = _replay_lazy_steps(monkeypatch)
    list(sample(denoise, scheduler, x, *conds, 1.0, replace(settings, lazy_tolerance=tolerance), 10,
                timesteps_set=True))
    skipped = torch.cat([sizes[~steered] for sizes, steered in replayed])
    assert len(skipped) > 0
    if growth == 1.5:
        assert (skipped < tolerance).all(), skipped / tolerance
    else:
        assert (skipped > tolerance).any(), skipped / tolerance


def test_one_call_gives_the_same_numbers_with_hot_cold_and_surprised_images(tiny_sd, monkeypatch):
    import trasce.sampler as sampler

    kwargs = dict(num_inference_steps=STEPS, output_type="latent", latents=_latents(tiny_sd, batch=3))
    prompts = ["a red apple", "a blue car", "an apple"]
    lazy = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                    lazy_tolerance=1e-3)
    # A bound of 0 makes every cold image stay cold, and a large one makes every cold image a surprise
    # (a constant: "an apple" can measure a gradient norm of exactly 0, its prompt being the concept;
    # ``value * 0`` keeps an unmeasured image's NaN, as the sampler's own bound does);
    # between the two settings each kind of image occurs.
    for margin in (0.0, 1e6):
        monkeypatch.setattr(sampler._GradientNormEstimate, "bound", lambda self, m=margin: self.value * 0 + m)
        split, fused = lazy(prompts, **kwargs), lazy.with_settings(one_call=True)(prompts, **kwargs)
        assert torch.allclose(split.images, fused.images, atol=1e-4), (split.images - fused.images).abs().max()
        assert torch.equal(split.steered_steps, fused.steered_steps)
        if margin == 0.0:  # cold images skipped some backward passes
            assert split.steered_steps.min() < STEPS
        else:  # every cold image was a surprise and took its backward pass after all
            assert split.steered_steps.tolist() == [STEPS] * 3
        assert torch.allclose(split.min_distance, fused.min_distance, atol=1e-5)


def test_a_batch_known_to_be_cold_skips_the_question_and_still_catches_a_surprise(tiny_sd, monkeypatch):
    """After a step where every image was cold and none surprised, the next step knows it on the host.

    That step asks the GPU nothing about which images are cold (one wait fewer per step) and must
    give the numbers that asking gives, a surprise at step 3 included.
    """
    import trasce.sampler as sampler

    exact, prompts, kwargs = _exact_two_images(tiny_sd)
    lazy = exact.with_settings(lazy_tolerance=1e9)
    asked = []  # the estimate's bound is asked once per step that has cold images

    def bound(self):
        asked.append(None)
        return self.value * (float("inf") if len(asked) == 3 else 1.0)

    monkeypatch.setattr(sampler._GradientNormEstimate, "bound", bound)
    known_cold = []
    steering_step = sampler._steering_step

    def recording_step(*args, **kwargs):
        known_cold.append(args[10].all_cold)
        return steering_step(*args, **kwargs)

    monkeypatch.setattr(sampler, "_steering_step", recording_step)
    fast = lazy(prompts, **kwargs)
    # step 0 measures; 1 asks and finds both cold; 2 and 3 know it (3 is surprised); 4 asks; 5 knows
    assert known_cold == [False, False, True, True, False, True]
    assert fast.steered_steps.tolist() == [2, 2]

    asked.clear()
    monkeypatch.setattr(sampler._GradientNormEstimate, "all_cold", property(lambda self: False, lambda self, v: None),
                        raising=False)
    asking = lazy(prompts, **kwargs)
    assert torch.equal(asking.steered_steps, fast.steered_steps)
    assert torch.allclose(asking.images, fast.images, atol=1e-6)
    assert not torch.allclose(asking.images, exact(prompts, **kwargs).images, atol=1e-3)  # the skips mattered


def test_steered_images_take_one_call_on_cuda_for_a_few_latents_and_two_otherwise_unless_told(tiny_sd):
    exact, prompts, kwargs = _exact_two_images(tiny_sd)
    settings = exact.settings
    assert settings.one_call is None
    assert settings.uses_one_call(torch.device("cuda:1"), 4 * 4 * 64 * 64) is True  # four SD v1.4 latents, 512 px
    assert settings.uses_one_call("cuda", 5 * 4 * 64 * 64) is False
    assert settings.uses_one_call("cuda", 16 * 128 * 128) is False  # one SD3 latent at 1024 px
    assert settings.uses_one_call("cpu", 1) is False
    assert replace(settings, one_call=False).uses_one_call("cuda", 1) is False
    assert replace(settings, one_call=True).uses_one_call("cpu", 10**9) is True
    # A denoiser replaying CUDA graphs launches nothing per kernel: two calls, less arithmetic.
    assert settings.uses_one_call("cuda", 4 * 4 * 64 * 64, cuda_graphs=True) is False
    assert replace(settings, one_call=True).uses_one_call("cuda", 1, cuda_graphs=True) is True
    unet_forward, calls = tiny_sd.unet.forward, []

    def counting(*args, **kw):
        calls.append(None)
        return unet_forward(*args, **kw)

    tiny_sd.unet.forward = counting
    try:
        for one_call, per_step in ((None, 2), (False, 2), (True, 1)):  # on this CPU the default is two calls
            calls.clear()
            exact.with_settings(one_call=one_call)(prompts, **kwargs)
            assert len(calls) == per_step * STEPS, one_call
    finally:
        tiny_sd.unet.forward = unet_forward


def test_the_default_chooses_one_or_two_calls_at_each_step_by_the_steered_images(tiny_sd, monkeypatch):
    """As on CUDA with a limit of two latents: two calls where three images steer, one where two do."""
    from trasce.sampler import EraseSettings

    asked = []

    def choice(self, device, elements, cuda_graphs):
        asked.append(elements)
        return self.one_call if self.one_call is not None else elements <= 2 * 4 * 8 * 8

    monkeypatch.setattr(EraseSettings, "uses_one_call", choice)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", latents=_latents(tiny_sd, batch=3))
    prompts = ["a red apple", "a blue car", "an apple"]
    lazy = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                    lazy_tolerance=1e-3)
    chosen = lazy(prompts, **kwargs)
    hot = [elements // (4 * 8 * 8) for elements in asked]
    assert hot[0] == 3 and 2 in hot  # both choices were made
    assert len(asked) == STEPS
    two = lazy.with_settings(one_call=False)(prompts, **kwargs)
    assert torch.allclose(chosen.images, two.images, atol=1e-4), (chosen.images - two.images).abs().max()
    assert torch.equal(chosen.steered_steps, two.steered_steps)


def test_gradient_checkpointing_recomputes_and_gives_the_same_images(tiny_sd, monkeypatch):
    import torch.utils.checkpoint

    trasce, prompts, kwargs = _exact_two_images(tiny_sd)
    reference = trasce(prompts, **kwargs)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    trasce.enable_gradient_checkpointing()
    try:
        checkpointed = trasce(prompts, **kwargs)
        assert calls, "no block was checkpointed"
        calls.clear()
        trasce.with_settings(mode="none")(prompts, **kwargs)  # no gradients: nothing to checkpoint
        assert not calls
    finally:
        trasce.disable_gradient_checkpointing()
    assert torch.allclose(checkpointed.images, reference.images, atol=1e-5)
    monkeypatch.setattr(tiny_sd.unet, "_supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match="UNet2DConditionModel does not support gradient checkpointing"):
        trasce.enable_gradient_checkpointing()


def test_a_channels_last_denoiser_gives_the_same_images(tiny_sd):
    trasce, prompts, kwargs = _exact_two_images(tiny_sd)
    reference = trasce(prompts, **kwargs)
    tiny_sd.unet.to(memory_format=torch.channels_last)
    try:
        assert tiny_sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        channels_last = trasce(prompts, **kwargs)
    finally:
        tiny_sd.unet.to(memory_format=torch.contiguous_format)
    assert channels_last.steered_steps.tolist() == [STEPS] * 2

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    # another summation order in the convolutions: fp32 rounding, grown by six steered steps
    assert relative(channels_last.images, reference.images) < 2e-5
    # ... far below what steering changes, so that a wrong gradient would show
    unsteered = trasce.with_settings(mode="negation")(prompts, **kwargs)
    assert relative(unsteered.images, reference.images) > 1e-3


def test_the_denoiser_parameters_are_frozen_during_a_call_and_restored_after(tiny_sd):
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                      lazy_tolerance=None)
    tiny_sd.unet.conv_in.weight.requires_grad_(False)  # a user's own mix of flags comes back as it was
    flags = [p.requires_grad for p in tiny_sd.unet.parameters()]
    seen = []
    kwargs = dict(num_inference_steps=2, output_type="latent", latents=_latents(tiny_sd, batch=1))
    out = trasce(["a red apple"], callback=lambda step: seen.append(
        any(p.requires_grad for p in tiny_sd.unet.parameters())), **kwargs)
    assert seen == [False, False]
    assert [p.requires_grad for p in tiny_sd.unet.parameters()] == flags
    assert out.steered_steps.tolist() == [2]  # the steering gradient needs no parameter gradients
    with pytest.raises(RuntimeError, match="stop"):
        trasce(["a red apple"], callback=lambda step: (_ for _ in ()).throw(RuntimeError("stop")), **kwargs)
    assert [p.requires_grad for p in tiny_sd.unet.parameters()] == flags


def test_overlapping_calls_share_the_freeze_and_keep_their_own_timesteps(tiny_sd):
    # Two threads on one pipeline: A (2 steps) enters, B (5 steps) enters, A leaves, B leaves; each
    # waits inside its first step for the other. Each image is the one it makes alone, and the
    # flags come back although the last call out came in while the first had them off.
    import threading

    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                      lazy_tolerance=None)
    latents = _latents(tiny_sd, batch=1)
    alone = {steps: trasce(["a red apple"], num_inference_steps=steps, output_type="latent", latents=latents).images
             for steps in (2, 5)}
    a_inside, b_inside, a_done, together = threading.Event(), threading.Event(), threading.Event(), {}

    def first_step_waits(step, arrived, wait_for):
        if step.index == 0:
            arrived.set()
            assert wait_for.wait(timeout=60)

    def call(steps, arrived, wait_for, done=None):
        together[steps] = trasce(["a red apple"], num_inference_steps=steps, output_type="latent", latents=latents,
                                 callback=lambda step: first_step_waits(step, arrived, wait_for)).images
        if done is not None:
            done.set()

    a = threading.Thread(target=call, args=(2, a_inside, b_inside, a_done))
    a.start()
    assert a_inside.wait(timeout=60)
    call(5, b_inside, a_done)
    a.join()
    assert all(torch.equal(together[steps], alone[steps]) for steps in (2, 5))
    assert all(p.requires_grad for p in tiny_sd.unet.parameters())
    assert tiny_sd.scheduler.num_inference_steps is None  # the wrapped pipeline's scheduler is left alone


def test_a_model_loaded_under_inference_mode_generates_and_refuses_to_steer_with_a_reason(tmp_path):
    with torch.inference_mode():
        pipe = make_tiny_sd(tmp_path)
    kwargs = dict(num_inference_steps=1, output_type="latent", latents=_latents(pipe))
    images = TraSCEPipeline.from_pipe(pipe, mode="negation", concept="an apple")(["a red apple"], **kwargs).images
    expected = TraSCEPipeline.from_pipe(make_tiny_sd(tmp_path), mode="negation", concept="an apple")(
        ["a red apple"], **kwargs).images  # the same weights, loaded outside inference mode
    assert torch.equal(images, expected)
    with pytest.raises(ValueError, match="weights were loaded under torch.inference_mode, which keeps them out of "
                                         "autograd; the steering gradient needs them"):
        TraSCEPipeline.from_pipe(pipe, concept="an apple")(["a red apple"], **kwargs)


def test_a_compiled_and_an_uncompiled_call_on_one_unet_share_the_freeze(tiny_sd):
    from trasce.pipeline import frozen_parameters

    # A enters (compiled), B enters (uncompiled), A leaves while B still steers, then B leaves.
    a, b = frozen_parameters(torch.compile(tiny_sd.unet)), frozen_parameters(tiny_sd.unet)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())
    b.__exit__(None, None, None)
    assert all(p.requires_grad for p in tiny_sd.unet.parameters())


def test_steering_runs_under_inference_mode(tiny_sd):
    # as servers often call pipelines; the latents may be inference tensors too
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                      lazy_tolerance=None)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    expected = trasce(["a red apple"], latents=_latents(tiny_sd), **kwargs)
    with torch.inference_mode():
        out = trasce(["a red apple"], latents=_latents(tiny_sd), **kwargs)
    assert out.steered_steps.tolist() == [2] and torch.equal(out.images, expected.images)


def test_with_settings_checks_as_the_constructor(tiny_sd):
    plain = TraSCEPipeline.from_pipe(tiny_sd, mode="none")
    with pytest.raises(ValueError, match="no concept to erase: give a concept or a preset"):
        plain.with_settings(mode="trasce")
    nudity = plain.with_settings(mode="trasce", preset="nudity")
    assert nudity.concept.startswith("naked, nude") and (nudity.settings.loss_scale, nudity.settings.sigma) == (1.5, 2)
    # a new preset brings its own settings, except those given with it; other changes keep the rest
    violence = nudity.with_settings(preset="violence", sigma=3.0)
    assert violence.concept.startswith("hate,") and (violence.settings.loss_scale, violence.settings.sigma) == (1.5, 3)
    assert nudity.with_settings(sigma=0.5).concept == nudity.concept
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got 0"):
        nudity.with_settings(sigma=0.0)
    with pytest.raises(TypeError, match="with_settings\\(\\) got 'sigmaa'; it takes concept, kernel, "):
        nudity.with_settings(sigmaa=1.0)
    # A copy's call defaults are its own.
    copy = nudity.with_settings(sigma=0.5)
    copy.call_defaults["steps"] = 2
    assert nudity.call_defaults["steps"] != 2


def test_to_takes_what_diffusers_to_takes(tiny_sd):
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")
    assert trasce.to("cpu", torch.float64) is trasce and tiny_sd.unet.dtype == torch.float64
    trasce.to(dtype=torch.float32)
    assert tiny_sd.unet.dtype == torch.float32 and tiny_sd.text_encoder.dtype == torch.float32


def test_the_output_indexes_as_diffusers(tiny_sd):
    kwargs = dict(num_inference_steps=1, guidance_scale=7.5, output_type="pt")
    for pipe, parts in ((tiny_sd, 1), (with_safety_checker(tiny_sd, flags_every_image=False), 2)):
        expected = pipe(["a red apple"], latents=_latents(pipe), **kwargs)
        ours = TraSCEPipeline.from_pipe(pipe, mode="none")(["a red apple"], latents=_latents(pipe), **kwargs)
        assert len(ours.to_tuple()) == len(expected.to_tuple()) == parts  # the checker's flags where one ran
        assert torch.allclose(ours[0], expected[0], atol=1e-4)
        assert ours.to_tuple()[1:] == expected.to_tuple()[1:]
        # return_dict=False, as diffusers: the tuple itself
        plain = pipe(["a red apple"], latents=_latents(pipe), return_dict=False, **kwargs)
        tupled = TraSCEPipeline.from_pipe(pipe, mode="none")(["a red apple"], latents=_latents(pipe),
                                                              return_dict=False, **kwargs)
        assert type(tupled) is type(plain) is tuple and len(tupled) == len(plain) == 2  # None: no checker ran
        assert torch.allclose(tupled[0], plain[0], atol=1e-4) and tupled[1:] == plain[1:]


def test_offloaded_models_are_freed_after_a_call_as_in_diffusers(tiny_sd, monkeypatch):
    freed = []
    monkeypatch.setattr(tiny_sd, "maybe_free_model_hooks", lambda: freed.append(True))
    TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")(["a red apple"], num_inference_steps=1)
    assert freed == [True]


def test_compile_choices_map_to_torch_compile_arguments():
    from trasce.pipeline import compile_options

    assert compile_options("default") == {}
    assert compile_options("reduce-overhead") == {"mode": "reduce-overhead"}
    assert compile_options("cudagraphs") == {"backend": "cudagraphs", "dynamic": False}
    with pytest.raises(ValueError, match="unknown compile choice 'inductor'; expected one of default, "
                                         "reduce-overhead, max-autotune, max-autotune-no-cudagraphs, cudagraphs"):
        compile_options("inductor")


def test_a_denoiser_replaying_cuda_graphs_is_detected_and_the_sampler_told(tiny_sd, monkeypatch):
    from trasce.models.base import compile_module
    from trasce.sampler import EraseSettings

    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")
    unet = tiny_sd.unet
    assert not trasce.adapter.cuda_graphs
    try:  # nothing below is called, so nothing compiles
        for compiled, graphs in ((torch.compile(unet, mode="reduce-overhead"), True),
                                 (torch.compile(unet, mode="max-autotune"), True),
                                 (torch.compile(unet), False),
                                 (torch.compile(unet, mode="max-autotune-no-cudagraphs"), False),
                                 (compile_module(unet, backend="cudagraphs"), True),
                                 (torch.compile(unet, backend="cudagraphs"), False)):  # the caller's: unrecognised
            tiny_sd.unet = compiled
            assert trasce.adapter.cuda_graphs is graphs, compiled
        tiny_sd.unet = unet
        unet.up_blocks[0].compile(mode="reduce-overhead")  # one block, in place
        assert trasce.adapter.cuda_graphs
        unet.up_blocks[0]._compiled_call_impl = None
        trasce.compile(backend="cudagraphs")
        assert trasce.adapter.cuda_graphs
    finally:
        tiny_sd.unet = unet
        unet.up_blocks[0]._compiled_call_impl = None
    assert not trasce.adapter.cuda_graphs

    told = []
    choose = EraseSettings.uses_one_call
    monkeypatch.setattr(EraseSettings, "uses_one_call", lambda self, *args: told.append(args[2]) or choose(self, *args))
    trasce(["a red apple"], num_inference_steps=2, output_type="latent")
    monkeypatch.setattr(type(trasce.adapter), "cuda_graphs", property(lambda self: True))
    trasce(["a red apple"], num_inference_steps=2, output_type="latent")
    assert told == [False, False, True, True]


def test_a_compiled_denoiser_is_detected_however_it_was_compiled(tiny_sd):
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")
    unet = tiny_sd.unet
    assert not trasce.adapter.compiled
    try:
        tiny_sd.unet = torch.compile(unet)
        assert trasce.adapter.compiled
        with pytest.raises(ValueError, match="the pipeline's unet is already compiled"):
            trasce.compile()
        tiny_sd.unet = unet
        unet.up_blocks[0].compile()  # one block, in place, as diffusers' compile_repeated_blocks does
        assert trasce.adapter.compiled
        unet.up_blocks[0]._compiled_call_impl = None
        assert not trasce.adapter.compiled
        unet.forward = torch.compile(unet.forward)
        assert trasce.adapter.compiled
    finally:
        tiny_sd.unet = unet
        unet.up_blocks[0]._compiled_call_impl = None
        unet.__dict__.pop("forward", None)
    assert not trasce.adapter.compiled


@pytest.mark.parametrize("margin", [0.0, 1e6])  # cold images that stay cold; cold images that surprise
def test_the_sampler_never_reads_a_denoiser_output_after_the_next_denoiser_call(tiny_sd, monkeypatch, margin):
    """A denoiser compiled with CUDA graphs (mode "reduce-overhead") reuses its output memory at its
    next call; here every output turns to NaN then, and every path must give the same numbers."""
    import trasce.sampler as sampler

    monkeypatch.setattr(sampler._GradientNormEstimate, "bound", lambda self: self.value * margin)
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                      lazy_tolerance=1e-3)
    adapter, scheduler = trasce.adapter, tiny_sd.scheduler
    prompts = ["a red apple", "a blue car", "an apple"]
    x = _latents(tiny_sd, batch=3)
    conds = adapter.encode_unconditional(3), adapter.encode(prompts), adapter.encode(["an apple"] * 3)
    live = []

    def reusing(model_input, t, cond):
        for output in live:
            output.detach().fill_(float("nan"))
        live.clear()
        live.append(adapter.denoise(model_input, t, cond))
        return live[-1]

    for settings in (trasce.settings, replace(trasce.settings, one_call=True),
                     replace(trasce.settings, lazy_tolerance=None), replace(trasce.settings, mode="negation")):
        expected = list(sample(adapter.denoise, scheduler, x, *conds, 7.5, settings, STEPS))[-1].latents
        got = list(sample(reusing, scheduler, x, *conds, 7.5, settings, STEPS))[-1].latents
        assert torch.equal(got, expected), settings


def test_every_new_shape_of_the_steering_call_is_checked_once_against_the_reference(tiny_sd, monkeypatch):
    """The check that guards compiled denoisers, with a reference that agrees and one that does not."""
    import trasce.sampler as sampler

    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                      lazy_tolerance=None)
    adapter, scheduler = trasce.adapter, tiny_sd.scheduler
    prompts = ["a red apple", "a blue car", "an apple"]
    x = _latents(tiny_sd, batch=3)
    cond_p, cond_c = adapter.encode(prompts), adapter.encode(["an apple"] * 3)
    cond_0 = adapter.encode_unconditional(3)
    checked, gradient_calls = [], []

    def run(settings, check):
        def denoise(model_input, t, cond):
            if torch.is_grad_enabled():
                gradient_calls.append(len(model_input))
            return adapter.denoise(model_input, t, cond)

        steps = sample(denoise, scheduler, x, cond_0, cond_p, cond_c, 7.5, settings, STEPS, gradient_check=check)
        return [step.latents for step in steps][-1]

    def reference(model_input, t, cond):
        checked.append(len(model_input))
        return adapter.denoise(model_input, t, cond)

    plain = run(trasce.settings, None)
    check = GradientCheck(reference)
    assert torch.equal(run(trasce.settings, check), plain)
    assert checked == [6]  # the prompt and concept rows of the 3 steered images, once
    run(trasce.settings, check)
    assert checked == [6]  # that shape passed: not checked again
    run(replace(trasce.settings, one_call=True), check)
    assert checked == [6, 9]  # one call: the empty prompt's rows ride along, a new shape
    # Lazy steering with a zero gradient-norm estimate: images go cold and the gradient call shrinks.
    monkeypatch.setattr(sampler._GradientNormEstimate, "bound", lambda self: self.value * 0)
    gradient_calls.clear()
    run(replace(trasce.settings, lazy_tolerance=1e-3), check)
    new_shapes = set(gradient_calls) - {6}
    assert new_shapes and sorted(checked[2:]) == sorted(new_shapes)  # each new shape, once
    # A reference whose products are 1.1 times larger: |g - 1.1 g| / |1.1 g| = 1/11, over the 5 % tolerance.
    # Its first step is the first of 6 DDIM steps 1000 // 6 = 166 apart, plus steps_offset 1: 5 * 166 + 1 = 831.
    with pytest.raises(CompiledGradientError, match=r"differs from the uncompiled denoiser's by 9% \(relative L2 "
                                                    r"of a random vector-Jacobian product over 3 image\(s\) at "
                                                    r"timestep 831"):
        run(trasce.settings, GradientCheck(lambda model_input, t, cond: adapter.denoise(model_input, t, cond) * 1.1))


@pytest.mark.slow
def test_a_compiled_denoiser_steers_with_the_right_gradient_or_stops(tiny_sd):
    trasce, prompts, kwargs = _exact_two_images(tiny_sd)
    unet = tiny_sd.unet
    reference = trasce(prompts, **kwargs)
    try:
        # aot_eager traces and differentiates the UNet as inductor does, without generating kernels: right.
        torch._dynamo.reset()
        trasce.compile(backend="aot_eager")
        assert tiny_sd.unet._orig_mod is unet
        compiled = trasce(prompts, **kwargs)
        assert compiled.steered_steps.tolist() == [STEPS] * 2
        assert torch.allclose(compiled.images, reference.images, atol=1e-4)
        # inductor on CPU (torch 2.13) zeroes the input gradient through the up blocks: never a wrong image.
        tiny_sd.unet = unet
        torch._dynamo.reset()
        trasce.compile()
        try:
            compiled = trasce(prompts, **kwargs)
        except CompiledGradientError:
            pass
        else:
            assert torch.allclose(compiled.images, reference.images, atol=1e-3)
    finally:
        tiny_sd.unet = unet
        torch._dynamo.reset()


def test_half_precision_denoisers_steer_float32_latents(tmp_path):
    """A steering update below bf16's rounding step (4e-3 near 1, 3e-2 near 8) still moves the latent, by eta.

    After the first step, latents steered with step size eta, 2 eta and 3 eta differ by equal increments:
    the denoiser's inputs and outputs are the same in the three calls, and only the update changes.
    """
    pipe = make_tiny_sd(tmp_path).to(dtype=torch.bfloat16)
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple", loss_scale=3.0, sigma=20.0, lazy_tolerance=None)
    after_first_step, eta = [], 0.1
    for step_size in (eta, 2 * eta, 3 * eta):
        out = trasce.with_settings(step_size=step_size)(
            "a red apple", num_inference_steps=2, output_type="latent", latents=_latents(pipe),
            callback=lambda step: after_first_step.append(step.latents) if step.index == 0 else None)
    assert out.images.dtype == torch.bfloat16  # returned as diffusers returns latents
    assert all(x.dtype == torch.float32 for x in after_first_step)
    one, two, three = after_first_step
    increment = two - one
    assert 1e-4 < increment.abs().max() < 4e-3
    assert torch.allclose(three - two, increment, rtol=1e-2, atol=5e-6)  # float32 rounding of latents up to 10


def test_the_denoiser_dtype_is_asked_per_call_not_per_step(tiny_sd, monkeypatch):
    """diffusers' ``ModelMixin.dtype`` walks the module (over a millisecond for SD v1.4's UNet): not in the loop."""
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", lazy_tolerance=None)
    adapter_class = type(trasce.adapter)
    asked = []
    monkeypatch.setattr(adapter_class, "dtype", property(lambda self: asked.append(1) or self.denoiser_module.dtype))
    counts = []
    for steps in (2, 6):
        asked.clear()
        trasce("a red apple", num_inference_steps=steps, output_type="latent", latents=_latents(tiny_sd))
        counts.append(len(asked))
    assert counts[0] == counts[1] <= 4, counts


def test_bad_arguments(tiny_sd):
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")
    with pytest.raises(ValueError, match="multiples of 8 for Stable Diffusion 1.x/2.x; got 60x64"):
        trasce("a car", height=60, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale has 3 values for 2 prompts"):
        trasce(["a", "b"], guidance_scale=[1, 2, 3], num_inference_steps=1)
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        trasce(["a", "b"], generator=[torch.Generator()], num_inference_steps=1)
    with pytest.raises(ValueError, match="num_inference_steps must be a whole number of at least 1, got 0"):
        trasce("a car", num_inference_steps=0)
    with pytest.raises(ValueError, match="num_inference_steps must be a whole number of at least 1, got 2.5"):
        trasce("a car", num_inference_steps=2.5)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a whole number of at least 1, got 0"):
        trasce("a car", num_inference_steps=1, num_images_per_prompt=0)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a whole number of at least 1, got '2'"):
        trasce("a car", num_inference_steps=1, num_images_per_prompt="2")
    with pytest.raises(ValueError, match="output_type must be one of 'pil', 'np', 'pt', 'latent', got 'PIL'"):
        trasce("a car", num_inference_steps=1, output_type="PIL")
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or a list of them \(one per image\), "
                                        r"got int 0; torch.Generator\(\).manual_seed\(0\) makes one from a seed"):
        trasce("a car", num_inference_steps=1, generator=0)
    # An empty concept at call time (a blank cell) would erase nothing: refused, per prompt.
    with pytest.raises(ValueError, match="an empty concept for prompt 'b': nothing would be erased"):
        trasce(["a", "b"], concept=["an apple", "  "], num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got nan"):
        trasce("a car", num_inference_steps=1, guidance_scale=float("nan"))
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings, got NoneType"):
        trasce(None, num_inference_steps=1)
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings; it holds int"):
        trasce(["a car", 3], num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown mode 'erase'"):
        TraSCEPipeline.from_pipe(tiny_sd, concept="x", mode="erase")
    with pytest.raises(ValueError, match="preset 'style' needs the concept named"):
        TraSCEPipeline.from_pipe(tiny_sd, preset="style")
    one_concept = r"TraSCE steers each image away from one concept text. Words for one concept go in one text, "
    with pytest.raises(TypeError, match=r"^concept must be one text, got list \['nudity', 'violence'\]: "
                                        + one_concept):
        TraSCEPipeline.from_pipe(tiny_sd, concept=["nudity", "violence"])
    with pytest.raises(ValueError, match=r"^concept has 2 values for 1 prompts; give one or one per prompt. "
                                         + one_concept):
        trasce("a car", concept=["nudity", "violence"], num_inference_steps=1)
    with pytest.raises(TypeError, match=r"^concept per prompt must be texts, got \[\['nudity', 'violence'\]\]. "
                                        + one_concept):
        trasce(["a car"], concept=[["nudity", "violence"]], num_inference_steps=1)
    with pytest.raises(TypeError, match="is not supported; trasce supports: StableDiffusionPipeline"):
        TraSCEPipeline.from_pipe(object(), concept="x")
    with pytest.raises(ValueError, match=r"steer_window must be \(start, end\) .*; got \(0.1, 0.2, 0.3\)"):
        TraSCEPipeline.from_pipe(tiny_sd, concept="x", steer_window=(0.1, 0.2, 0.3))
    # Settings of the wrong type are named with their value, not left to fail inside float() or a comparison.
    with pytest.raises(TypeError, match=r"^sigma must be a number, got str 'x'$"):
        trasce.with_settings(sigma="x")
    with pytest.raises(ValueError, match=r"^lazy_tolerance must be a number of at least 0 \(or None: exact\), "
                                         r"got '1'$"):
        trasce.with_settings(lazy_tolerance="1")
    with pytest.raises(ValueError, match=r"\(\(0, 1\) steers at every step\); got None$"):
        trasce.with_settings(steer_window=None)
    with pytest.raises(ValueError, match=r"^one_call must be True, False or None \(chosen at each step\), got 1$"):
        trasce.with_settings(one_call=1)
    with pytest.raises(ValueError, match=r"^height must be a whole number of pixels of at least 1 \(or None: the "
                                         r"model's 64x64\), got -8$"):
        trasce("a car", height=-8, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"^width must be a whole number .*, got 63.5$"):
        trasce("a car", width=63.5, num_inference_steps=1)
    # diffusers' arguments that the call does not take say what to give instead.
    with pytest.raises(TypeError, match=r"^TraSCEPipeline's call does not take 'negative_prompt': the concept's branch "
                                        r"takes its place: give concept="):
        trasce("a car", negative_prompt="an apple", num_inference_steps=1)
    with pytest.raises(TypeError, match=r"^TraSCEPipeline's call does not take 'clip_skip' \(and 'eta'\): it takes "
                                        r"prompt, num_inference_steps, .*, return_dict$"):
        trasce("a car", eta=0.0, clip_skip=1, num_inference_steps=1)


@pytest.mark.parametrize("window, steps, expected", [
    ((0.0, 1.0), 25, (0, 25)),
    ((0.14, 1.0), 50, (7, 50)),  # 0.14 * 50 is 7.000000000000001 in floating point: step 7 is in
    ((0.0, 0.14), 50, (0, 7)),  # ... and here it is out
    ((0.3, 0.7), 4, (2, 3)),  # 1.2 <= i < 2.8
    ((0.5, 0.5), 10, (5, 5)),  # empty
])
def test_steer_window_steps(window, steps, expected):
    assert EraseSettings(steer_window=window).window_steps(steps) == expected


def test_a_zero_terminal_snr_first_step_leaves_lazy_steering_and_the_statistics_alone(tiny_sd):
    """At alpha-bar 0 (zero terminal SNR, v-prediction) the prompt and concept predict the same noise:
    d is 0 at every latent and its gradient too. That step must neither teach the lazy path's
    gradient-norm estimate 0 (which would skip every later backward pass) nor count as the image
    coming as near the concept as it can (kernel 1)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, prediction_type="v_prediction",
                                          rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe = type(tiny_sd)(**{**tiny_sd.components, "scheduler": scheduler})
    exact, prompts, kwargs = _exact_two_images(pipe)
    reference = exact(prompts, **kwargs)
    assert reference.steered_steps.tolist() == [STEPS, STEPS]
    assert (reference.max_kernel < 0.999).all(), reference.max_kernel
    lazy = exact.with_settings(lazy_tolerance=1e-7)(prompts, **kwargs)
    assert lazy.steered_steps.tolist() == [STEPS, STEPS]
    assert torch.allclose(lazy.images, reference.images, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_image_does_not_depend_on_its_batch_sharing_one_cfg_scale(tmp_path, dtype):
    """Per-image CFG scales go in as a tensor; a half-precision model must not round them (7.3 is
    7.3125 in bf16), nor the guided prediction, where one shared scale stays a Python float."""
    pipe = make_tiny_sd(tmp_path).to(dtype=dtype)
    trasce = TraSCEPipeline.from_pipe(pipe, concept="an apple", loss_scale=3.0, step_size=2.0, sigma=20.0,
                                      lazy_tolerance=None)
    latents = _latents(pipe, batch=2)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent")
    both = trasce(["a red apple", "a blue car"], guidance_scale=[7.3, 3.0], latents=latents, **kwargs).images
    for i, (prompt, scale) in enumerate((("a red apple", 7.3), ("a blue car", 3.0))):
        alone = trasce(prompt, guidance_scale=scale, latents=latents[i : i + 1], **kwargs).images
        assert torch.allclose(both[i : i + 1].float(), alone.float(), atol=1e-6), (both[i] - alone[0]).abs().max()


def test_a_zero_dimensional_cfg_scale_is_one_scale(tiny_sd):
    import numpy as np

    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple", lazy_tolerance=None)
    kwargs = dict(num_inference_steps=2, output_type="latent", latents=_latents(tiny_sd, batch=2))
    expected = trasce(["a red apple", "a car"], guidance_scale=5.0, **kwargs).images
    for scale in (torch.tensor(5.0), np.float32(5.0), np.array(5.0)):
        assert torch.equal(trasce(["a red apple", "a car"], guidance_scale=scale, **kwargs).images, expected)


def _first_step_by_hand(pipe, prompt: str, concept: str, latents: torch.Tensor):
    """The first DDIM step's inputs, by hand: the scheduler, its timestep, the latent ``x``, a leaf
    ``xg`` of it, the empty prompt's prediction at ``x`` and the prompt's and concept's at ``xg``."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    x = latents * scheduler.init_noise_sigma
    e_0, e_p, e_c = (_embed(pipe, text) for text in ("", prompt, concept))
    with torch.no_grad():
        pred_0 = pipe.unet(x, t, encoder_hidden_states=e_0).sample
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        pred_p, pred_c = pipe.unet(torch.cat([xg, xg]), t, encoder_hidden_states=torch.cat([e_p, e_c])).sample.chunk(2)
    return scheduler, t, x, xg, pred_0, pred_p, pred_c


def test_the_gaussian_kernel_steers_by_its_own_gradient(tiny_sd):
    """One step of kernel="gaussian", written out: L = -lam * exp(-d^2 / (2 sigma^2)) on the DDIM latent."""
    lam, eta, sigma, scale = 3.0, 2.0, 2.0, 7.5
    prompt, concept = "a red apple", "an apple"
    latents = _latents(tiny_sd)
    steps = []
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept=concept, loss_scale=lam, step_size=eta, sigma=sigma,
                                      kernel="gaussian", lazy_tolerance=None)
    trasce(prompt, num_inference_steps=STEPS, guidance_scale=scale, latents=latents.clone(), output_type="latent",
           callback=steps.append)

    scheduler, t, x, xg, pred_0, pred_p, pred_c = _first_step_by_hand(tiny_sd, prompt, concept, latents)
    with torch.enable_grad():
        d = (pred_p - pred_c).norm()
        (grad,) = torch.autograd.grad(-lam * torch.exp(-d**2 / (2 * sigma**2)), xg)
    guided = pred_0 + scale * (pred_p.detach() - pred_c.detach())
    expected = scheduler.step(guided, t, x - eta * grad, return_dict=False)[0]
    assert (eta * grad).abs().max() > 1e-3  # the kernel is on: the comparison tests the steering
    assert torch.allclose(steps[0].latents, expected, atol=1e-5), (steps[0].latents - expected).abs().max()
    assert torch.allclose(steps[0].kernel, torch.exp(-d.detach()**2 / (2 * sigma**2)).reshape(1), atol=1e-6)


def test_under_v_prediction_steering_differentiates_the_noise_equivalent_distance(tmp_path):
    """One steered step of a v-prediction model (SD 2.x), written out: d = sqrt(alpha_bar_t) * ||v_p - v_c||
    (the noise predictions' distance), L = -lam * exp(-d / sigma), and the latent steps by -eta * dL/dx."""
    lam, eta, sigma, scale = 3.0, 2.0, 20.0, 7.5
    prompt, concept = "a red apple", "an apple"
    pipe = make_tiny_sd(tmp_path, prediction_type="v_prediction")
    latents = _latents(pipe)
    steps = []
    trasce = TraSCEPipeline.from_pipe(pipe, concept=concept, loss_scale=lam, step_size=eta, sigma=sigma,
                                      lazy_tolerance=None)
    trasce(prompt, num_inference_steps=STEPS, guidance_scale=scale, latents=latents.clone(), output_type="latent",
           callback=steps.append)

    scheduler, t, x, xg, v_0, v_p, v_c = _first_step_by_hand(pipe, prompt, concept, latents)
    with torch.enable_grad():
        d = scheduler.alphas_cumprod[int(t)].sqrt() * (v_p - v_c).norm()
        (grad,) = torch.autograd.grad(-lam * torch.exp(-d / sigma), xg)
    guided = v_0 + scale * (v_p.detach() - v_c.detach())
    expected = scheduler.step(guided, t, x - eta * grad, return_dict=False)[0]
    assert (eta * grad).abs().max() > 1e-3  # the kernel is on: the comparison tests the steering
    assert torch.allclose(steps[0].distance, d.detach().reshape(1), rtol=1e-5)
    assert torch.allclose(steps[0].latents, expected, atol=1e-5), (steps[0].latents - expected).abs().max()


def test_reported_distance_and_kernel_are_the_steps_extremes(tiny_sd):
    """out.min_distance and out.max_kernel are the smallest d and largest kernel over the steps, per image."""
    exact, prompts, kwargs = _exact_two_images(tiny_sd)
    steps = []
    out = exact(prompts, **kwargs, callback=steps.append)
    distances = torch.stack([step.distance for step in steps])  # (steps, images)
    assert len(steps) == STEPS and torch.equal(out.min_distance, distances.min(dim=0).values)
    assert torch.allclose(out.max_kernel, torch.exp(-distances / exact.settings.sigma).max(dim=0).values)
    assert (distances.max(dim=0).values > distances.min(dim=0).values).all()  # d moves: the minimum is chosen


def test_a_concept_per_prompt_is_each_prompts_own(tiny_sd):
    exact, prompts, kwargs = _exact_two_images(tiny_sd)
    latents = kwargs.pop("latents")
    concepts = ["an apple", "a blue car"]
    both = exact(prompts, concept=concepts, latents=latents, **kwargs).images
    for i, (prompt, concept) in enumerate(zip(prompts, concepts, strict=True)):
        alone = exact(prompt, concept=concept, latents=latents[i : i + 1], **kwargs).images
        assert torch.allclose(both[i : i + 1], alone, atol=1e-4), (both[i] - alone[0]).abs().max()  # batch rounding
    shared = exact(prompts, concept="an apple", latents=latents, **kwargs).images
    assert torch.allclose(both[0], shared[0], atol=1e-4) and (both[1] - shared[1]).abs().max() > 1e-2


def test_under_euler_lazy_steering_takes_every_update_above_its_tolerance():
    """Euler's sample is x = c * x_in, with c = sqrt(sigma^2 + 1) falling from 14.6 to about 1 over SD's
    schedule, while the denoiser sees x_in. Here the prompt and concept predictions differ by
    W x_in + b, so ||dd/dx_in|| barely changes from step to step, and ||dd/dx|| = ||dd/dx_in|| / c
    grows 14-fold. Lazy steering bounds updates on x_in: with a tolerance at half the smallest
    released update (eta * ||dL/dx_in||, RMS), it must take every backward pass, as the exact path."""
    from diffusers import EulerDiscreteScheduler

    import trasce.sampler as sampler

    g = torch.Generator().manual_seed(0)
    n = 4 * 8 * 8
    w, b = 0.05 * torch.randn(n, n, generator=g) / n**0.5, 0.2 * torch.randn(n, generator=g)

    def denoise(x_in, t, cond):  # branch 1 (the prompt) differs from branches 0 and 2 by W x_in + b
        flat = x_in.flatten(1).float()
        prompt = (cond["branch"] == 1).float()[:, None]
        return (0.1 * flat + prompt * (flat @ w.T + b)).reshape(x_in.shape)

    conds = [{"branch": torch.tensor([float(k)])} for k in range(3)]
    settings = EraseSettings(loss_scale=1.0, step_size=1.0, sigma=100.0, lazy_tolerance=None)  # a flat kernel
    x = torch.randn(1, 4, 8, 8, generator=g)
    released = []  # per step: eta * ||dL/dx_in|| as RMS, from dL/dx_in = c * dL/dx
    steer = sampler.guidance.steer

    def runs(settings, record=False):
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        scheduler.set_timesteps(10)

        def recording_steer(latents, grad, step_size):
            c = sampler.input_scale(scheduler, scheduler.timesteps[scheduler.step_index])
            released.append(settings.step_size * c * float(grad.pow(2).mean().sqrt()))
            return steer(latents, grad, step_size)

        sampler.guidance.steer = recording_steer if record else steer
        try:
            return list(sample(denoise, scheduler, x * scheduler.init_noise_sigma, *conds, 1.0, settings, 10,
                               timesteps_set=True))
        finally:
            sampler.guidance.steer = steer

    exact = runs(settings, record=True)
    assert len(released) == 10 and max(released) < 2 * min(released)  # the updates stay of one size
    lazy = runs(replace(settings, lazy_tolerance=0.5 * min(released)))
    assert [bool(step.steered) for step in lazy] == [True] * 10
    assert torch.allclose(lazy[-1].latents, exact[-1].latents, atol=1e-5)


def test_an_image_that_overflows_is_named_and_marked(tiny_sd):
    trasce = TraSCEPipeline.from_pipe(tiny_sd, concept="an apple")
    with pytest.warns(RuntimeWarning, match=r"^image 1 of the batch \('b', CFG 1e\+30, \.\.\.\) came out with NaN or "
                                            r"inf in its final latent"):
        out = trasce(["a", "b"], guidance_scale=[7.5, 1e30], num_inference_steps=2, output_type="latent")
    assert out.finite.tolist() == [True, False]
    assert out.images[0].isfinite().all() and not out.images[1].isfinite().all()
    # Decoded, it is the one warning, of its own category: numpy's cast of the NaNs to 8 bits says nothing more.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trasce(["a", "b"], guidance_scale=[7.5, 1e30], num_inference_steps=2, output_type="pil")
    assert [type(w.message) for w in caught] == [NonFiniteImageWarning], [str(w.message) for w in caught]
