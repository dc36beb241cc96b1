"""The embedded world, its captions, the shipped model (offline) and the demo."""

import json
import random
import re

import pytest
import torch

from trasce.toy import captions, world


def test_world_is_deterministic_from_a_seed():
    a = world.render(world.sample_scenes(16, torch.Generator().manual_seed(3)))
    b = world.render(world.sample_scenes(16, torch.Generator().manual_seed(3)))
    c = world.render(world.sample_scenes(16, torch.Generator().manual_seed(4)))
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_fixed_attributes_and_palette():
    scene = world.sample_scenes(4, torch.Generator().manual_seed(0), fixed={"background": 1, "color": 0})
    images = world.render(scene)
    corner = images[:, :, 0, 0]  # the background shows in the corner; white is (238, 238, 238)
    assert torch.allclose(corner, torch.full_like(corner, 238 / 127.5 - 1), atol=1e-5)
    assert scene.color.tolist() == [0, 0, 0, 0]


def test_captions_split_and_mentions():
    rng = random.Random(0)
    labels = {"shape": 0, "color": 1, "fill": 2, "background": 0}
    for split in ("train", "val", "test"):
        caption = captions.caption_for(labels, rng, split)
        assert caption and captions.split_of(caption) == split
        said = captions.mentioned(caption)
        assert all(world.ATTRIBUTES[a][labels[a]] == v for a, v in said.items())
    assert captions.mentioned("a red plus sign") == {"shape": "cross", "color": "red"}
    assert captions.mentioned("a disc on a dark background") == {"shape": "circle", "background": "black"}
    tokenizer = captions.build_tokenizer()
    for word in captions.vocabulary_words():
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id


def test_test_captions_are_never_training_captions():
    test = captions.caption_set(50, "test", seed=1, require=("shape",))
    rng = random.Random(2)
    training = {captions.caption_for({a: rng.randrange(len(v)) for a, v in world.ATTRIBUTES.items()}, rng, "train")
                for _ in range(3000)}
    assert not set(test) & training


@pytest.fixture(scope="module")
def toy_pipe():
    from trasce import TraSCEPipeline

    return TraSCEPipeline.from_pretrained("toy", mode="none")


def test_a_model_that_is_neither_a_folder_nor_cached_says_what_to_give():
    from trasce.pipeline import load_diffusers_pipeline

    with pytest.raises(OSError, match=r"^cannot load model 'no-such-org/no-such-model': there is no such folder "
                                      r"here, and no hub model of that id is in the local cache or could be "
                                      r"downloaded \(offline, .*; give a diffusers folder, a cached hub id, or 'toy'\. "
                                      r"diffusers said: (?!.*stacktrace above)"):
        load_diffusers_pipeline("no-such-org/no-such-model", local_files_only=True)  # never asks the network


def test_shipped_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DiffusionPipeline

    from trasce.pipeline import embedded_model_path, load_diffusers_pipeline

    pipe = load_diffusers_pipeline("toy")
    assert pipe.vae is None and pipe.scheduler.config.clip_sample is True
    plain = DiffusionPipeline.from_pretrained(embedded_model_path(), vae=None)  # the ordinary diffusers way
    assert type(plain).__name__ == "StableDiffusionPipeline"
    files = list(embedded_model_path().rglob("*.safetensors"))
    judge = list((embedded_model_path().parent / "judge").rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files + judge) < 25e6


def test_fidelity_smoke(toy_pipe):
    """A few prompts at the model's defaults come out with the prompted shape, by the judge."""
    from trasce.pipeline import toy_defaults
    from trasce.toy.judge import Judge

    defaults = toy_defaults("toy")
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple cross", "a disc"]
    out = toy_pipe(prompts, num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance_scale"],
                   generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], output_type="pt")
    verdicts = Judge.load().classify(out.images * 2 - 1)
    shapes = [v["shape"] for v in verdicts]
    hits = sum(captions.mentioned(p)["shape"] == s for p, s in zip(prompts, shapes, strict=True))
    assert hits >= 5, list(zip(prompts, shapes, strict=True))


def test_corner_case_on_the_embedded_model(toy_pipe):
    """Prompt == concept: conventional negation still draws circles, TraSCE's negation mostly does not."""
    from trasce.toy.judge import Judge

    judge = Judge.load()
    rates = {}
    for mode in ("negative_prompt", "negation"):
        pipe = toy_pipe.with_settings(mode=mode, concept="circle")
        out = pipe(["circle"] * 8, num_inference_steps=25, guidance_scale=1.5, output_type="pt",
                   generator=[torch.Generator().manual_seed(100 + i) for i in range(8)])
        rates[mode] = sum(v["shape"] == "circle" for v in judge.classify(out.images * 2 - 1)) / 8
    # measured: 5 of 8 against 0 of 8; a bare "circle" is no training template, hence not 8 of 8
    assert rates["negative_prompt"] >= 0.5 and rates["negation"] <= 0.25, rates


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from click.testing import CliRunner

    from trasce.cli import main

    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "grid.png").exists()
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "TraSCE" in html and "negative prompt" in html and html.count("<img") >= 24 + 1
    assert "report:" in result.output
    counts = {label: (int(asked), int(others)) for label, asked, others in re.findall(
        r"(unprotected|negative prompt|TraSCE): shape = circle in (\d) of the 4 images whose prompt asks for it, "
        r"(\d) of the 4 others", result.output)}
    assert set(counts) == {"unprotected", "negative prompt", "TraSCE"}
    assert counts["TraSCE"][0] < counts["unprotected"][0], counts  # measured at 6 steps: 0 against 2
    assert "6 steps of DDIMScheduler, CFG 1.5" in html and "preset <code>toy-shape</code>" in html
    # other settings in the same folder: refused, then started afresh with --overwrite
    again = ["demo", "--out", str(tmp_path / "demo"), "--steps", "5"]
    result = CliRunner().invoke(main, again)
    assert result.exit_code == 2 and "'steps' was 6, now 5; use a new output folder or --overwrite" in result.output
    result = CliRunner().invoke(main, [*again, "--overwrite", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "demo" / "trasce" / "run.json").read_text())["settings"]["steps"] == 5


def test_demo_refuses_a_concept_the_judge_cannot_see(tmp_path):
    from click.testing import CliRunner

    from trasce.cli import main

    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--concept", "dog"])
    assert result.exit_code == 2
    assert result.output.startswith("error: concept 'dog' is not one value of the toy world; valid: shape circle")
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------------------------------
# Training (python -m trasce.toy.train, trasce train-toy): a few steps of 2 images


def _weights(pipeline):
    from safetensors.torch import load_file

    return {**load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors"),
            **load_file(pipeline / "text_encoder" / "model.safetensors")}


def test_training_stopped_by_a_signal_resumes_to_the_weights_of_an_unbroken_run(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from trasce.toy import train

    run = ["--steps", "4", "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "1"]
    unbroken = train.main(["--out", str(tmp_path / "a"), *run])

    real_batch, calls = train.training_batch, []

    def batch_then_stop(*args):
        calls.append(1)
        if len(calls) == 2:  # SIGTERM (as timeout sends it) arrives during the second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(*args)

    monkeypatch.setattr(train, "training_batch", batch_then_stop)
    stopped = train.main(["--out", str(tmp_path / "b"), *run])
    info = json.loads((stopped / "trasce_toy.json").read_text())
    assert (info["trained_steps"], info["stopped_by"]) == (2, "SIGTERM")
    assert info["arguments"] == {"steps": 4, "batch_size": 2, "seed": 0, "init": None, "lr": train.LEARNING_RATE,
                                 "offset_noise": 0.0, "minutes": None}
    assert info["defaults"] == {"guidance_scale": 1.5, "steps": 25}
    monkeypatch.setattr(train, "training_batch", real_batch)
    capsys.readouterr()

    with pytest.raises(SystemExit):  # the checkpoint's arguments, or nothing
        train.main(["--out", str(tmp_path / "b"), *run[:2], "--batch-size", "3", *run[4:], "--resume"])
    assert "checkpoint.pt was made with --batch-size 2, not 3: resume with the checkpoint's arguments" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):  # a run already there is not overwritten from scratch
        train.main(["--out", str(tmp_path / "b"), *run])
    assert "checkpoint.pt holds a run already: --resume continues it" in capsys.readouterr().err

    resumed = train.main(["--out", str(tmp_path / "b"), *run, "--resume"])
    assert f"resuming {tmp_path / 'b' / 'checkpoint.pt'} at step 2 of 4" in capsys.readouterr().err
    a, b = _weights(unbroken), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "trasce_toy.json").read_text())["trained_steps"] == 4


def test_align_takes_the_shipped_model_by_name(tmp_path):
    from trasce.toy import align

    out = align.main(["--model", "toy", "--out", str(tmp_path / "aligned"), "--steps", "1", "--batch-size", "2"])
    info = json.loads((out / "trasce_toy.json").read_text())
    assert info["alias_alignment"]["steps"] == 1 and info["defaults"] == {"guidance_scale": 1.5, "steps": 25}
