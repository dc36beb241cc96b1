"""``trasce generate`` end to end on a tiny random model saved to a folder."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from trasce.cli import main


class Killed(Exception):
    """Stands for the process being killed (click would turn a KeyboardInterrupt into an exit code)."""


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _write(path, text):
    path.write_text(text)
    return path


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


BASE = ("--steps", 2, "--height", 64, "--width", 64, "--quiet", "--concept", "an apple")


def test_generate_from_csv_writes_images_manifest_and_run_json(tiny_sd_folder, tmp_path):
    prompts = _write(tmp_path / "p.csv", "case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
                                         "7,a red apple,1,7.5,food\n9,\"a car, blue\",2,3.0,vehicles\n")
    out = tmp_path / "out"
    result = _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", out,
                  "--images-per-prompt", 2, "--batch-size", 3, *BASE)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["7_0.png", "7_1.png", "9_0.png", "9_1.png"]
    records = _manifest(out)
    assert [(r["case"], r["k"], r["seed"], r["guidance_scale"]) for r in records] == [
        ("7", 0, 1, 7.5), ("7", 1, 1, 7.5), ("9", 0, 2, 3.0), ("9", 1, 2, 3.0)]
    assert records[2]["prompt"] == "a car, blue" and records[2]["extra"] == {"categories": "vehicles"}
    assert records[0]["mode"] == "trasce" and records[0]["concept"] == "an apple"
    # per-image erasure statistics: the first step always takes its backward pass (it measures ||dd/dx||)
    assert all(1 <= r["steered_steps"] <= 2 and 0 <= r["max_kernel"] <= 1 and r["min_distance"] >= 0
               for r in records)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["steps"] == 2 and "torch" in run["versions"]
    assert run["settings"]["world"] == "diffusers"  # (the toy judge warns on such a folder)

    # Row 7's images are the API's from the noise its seed gives (generate.initial_noise), and differ.
    import numpy as np
    from PIL import Image

    from trasce import TraSCEPipeline
    from trasce.generate import initial_noise

    pipe = TraSCEPipeline.from_pretrained(str(tiny_sd_folder), concept="an apple")
    noise, generators = initial_noise(pipe, 1, 2, 64, 64)
    expected = pipe(["a red apple"] * 2, num_inference_steps=2, guidance_scale=7.5, latents=noise,
                    generator=generators, height=64, width=64, output_type="pil").images
    made = [np.asarray(Image.open(out / "images" / f"7_{k}.png"), dtype=float) for k in (0, 1)]
    for k in (0, 1):
        assert np.abs(made[k] - np.asarray(expected[k], dtype=float)).max() <= 1, k
    assert np.abs(made[0] - made[1]).mean() > 5  # two images of one prompt, not one image twice


def test_steps_and_cfg_left_out_are_the_models(tiny_sd_folder, tmp_path):
    from trasce.pipeline import model_call_defaults

    assert model_call_defaults(tiny_sd_folder) == {"guidance_scale": 7.5, "steps": 50}  # StableDiffusionPipeline's
    # What a folder recommends in trasce_toy.json (as the embedded model does) comes first.
    (tiny_sd_folder / "trasce_toy.json").write_text(json.dumps({"defaults": {"guidance_scale": 2.0, "steps": 3}}))
    out = tmp_path / "out"
    result = _run("generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--out", out, "--height", 64,
                  "--width", 64, "--quiet", "--concept", "an apple")
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["guidance_scale"], settings["steps"]) == (2.0, 3)
    assert settings["world"] == "toy"  # a folder with trasce_toy.json is a model of the embedded world
    assert _manifest(out)[0]["guidance_scale"] == 2.0


@pytest.mark.parametrize(("class_name", "said"), [
    (["pipeline_mine", "MyPipeline"], "names a custom pipeline (pipeline_mine.MyPipeline), code that ships with the "
                                      "model; trasce runs no such code itself: load it in Python"),
    ("MyPipeline", "names the pipeline class 'MyPipeline', which diffusers"),
    (None, "has no _class_name, the pipeline class that diffusers needs to load it"),
])
def test_a_folder_whose_pipeline_class_diffusers_lacks_is_refused_before_anything(tiny_sd_folder, tmp_path,
                                                                                  class_name, said):
    index = json.loads((tiny_sd_folder / "model_index.json").read_text())
    index.pop("_class_name")
    if class_name is not None:
        index["_class_name"] = class_name
    (tiny_sd_folder / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    result = _run("generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--out", out, "--quiet")
    assert result.exit_code == 2
    assert f"error: {tiny_sd_folder}'s model_index.json {said}" in " ".join(result.output.split())
    assert not out.exists()


def test_a_subclass_of_a_diffusers_pipeline_wraps_with_its_familys_defaults(tiny_sd):
    from diffusers import StableDiffusionPipeline

    from trasce.pipeline import TraSCEPipeline

    class MyPipeline(StableDiffusionPipeline):
        pass

    pipe = TraSCEPipeline(MyPipeline(**tiny_sd.components), concept="an apple")
    assert pipe.call_defaults == {"guidance_scale": 7.5, "steps": 50}
    assert pipe("a red apple", num_inference_steps=1, height=64, width=64, output_type="pt").images.shape == (
        1, 3, 64, 64)


def test_a_file_with_two_prompt_columns_says_which_it_read_unless_told(tiny_sd_folder, tmp_path):
    prompts = _write(tmp_path / "attack.csv", "case_number,prompt,adv_prompt\n1,a red apple,a r3d app1e\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(a) for a in (
        "generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", out, *BASE)])
    assert result.exit_code == 0, result.output
    assert (f"warning: {prompts} has the prompt columns 'adv_prompt', 'prompt'; the prompts are read from 'prompt' "
            "(the first of 'prompt', 'adv_prompt', 'sensitive prompt' that a row has), the others kept as data; give "
            "--prompt-column to read another") in result.stderr
    assert _manifest(out)[0]["prompt"] == "a red apple"
    told = tmp_path / "told"
    result = _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--prompt-column", "adv_prompt",
                  "--out", told, *BASE)
    assert result.exit_code == 0, result.output
    assert (_manifest(told)[0]["prompt"], _manifest(told)[0]["extra"]) == ("a r3d app1e", {"prompt": "a red apple"})
    assert json.loads((told / "run.json").read_text())["settings"]["prompt_column"] == "adv_prompt"


def test_a_published_preset_on_another_latent_size_warns_with_a_scaled_sigma(tiny_sd_folder, tmp_path):
    # tiny SD at 64 px: a 4x8x8 latent, 1/64 of SD v1.4's 4x64x64, so distances about 1/8 as large
    result = CliRunner().invoke(main, [str(a) for a in (
        "generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--preset", "nudity", "--steps", 1,
        "--height", 64, "--width", 64, "--out", tmp_path / "out", "--quiet")])
    assert result.exit_code == 0, result.output
    assert ("warning: preset 'nudity''s sigma 2 is for SD v1.4's 4x64x64 latent; this model's latent at 64x64 holds "
            "0.0156x as many numbers, so its distances run about 0.125x as large: start from --sigma 0.25") in \
        result.stderr


def test_a_models_safety_checker_runs_only_when_asked(tiny_sd, tmp_path):
    import numpy as np
    from conftest import with_safety_checker
    from PIL import Image

    from trasce.pipeline import load_diffusers_pipeline

    folder = tmp_path / "sd-with-checker"
    with_safety_checker(tiny_sd, flags_every_image=True).save_pretrained(folder)
    assert load_diffusers_pipeline(folder).safety_checker is not None  # diffusers' default, kept by the API
    assert load_diffusers_pipeline(folder, safety_checker=False).safety_checker is None

    runs = {}
    for name, flag in (("without", ()), ("with", ("--safety-checker",))):
        out = tmp_path / name
        assert _run("generate", "--model", folder, "--prompt", "a red apple", "--out", out, *flag, *BASE).exit_code == 0
        record = _manifest(out)[0]
        runs[name] = (json.loads((out / "run.json").read_text())["settings"]["safety_checker"],
                      record.get("nsfw_content_detected"), np.asarray(Image.open(out / record["file"])).max())
    assert runs["without"][:2] == (False, None) and runs["without"][2] > 0
    assert runs["with"] == (True, True, 0)  # flagged, and black as diffusers makes it
    # a folder made without the checker does not resume with it
    again = _run("generate", "--model", folder, "--prompt", "a red apple", "--out", tmp_path / "without",
                 "--safety-checker", *BASE)
    assert again.exit_code != 0 and "'safety_checker' was false, now true" in again.output
    # trasce bench loads the model without it too (trasce benchmark: tests/test_benchmark.py)
    from trasce.bench import load_for_bench

    assert load_for_bench(str(folder), torch.float32, torch.device("cpu")).safety_checker is None


def test_images_guided_below_one_before_guidance_switched_off_there_are_not_resumed(tiny_sd_folder, tmp_path):
    """Modes none and negative_prompt once guided rows at scales <= 1; now they take the prompt's prediction
    alone. An image made since carries a mark in the manifest; one made before (no mark) stops a resume."""
    outcome = {}
    for scale, strip_mark in ((0.5, False), (0.5, True), (7.5, True)):
        out = tmp_path / f"scale-{scale}-{strip_mark}"
        args = ("generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--prompt", "a blue car",
                "--out", out, "--mode", "none", "--guidance-scale", scale, *BASE)
        assert _run(*args, "--end", 1).exit_code == 0
        records = _manifest(out)
        assert records[0].get("guidance_off_at_or_below_one") is (True if scale <= 1 else None)
        if strip_mark:  # as the manifest of a folder made before the mark existed
            (out / "manifest.jsonl").write_text("".join(
                json.dumps({k: v for k, v in r.items() if k != "guidance_off_at_or_below_one"}) + "\n"
                for r in records))
        outcome[scale, strip_mark] = _run(*args)
    assert outcome[0.5, False].exit_code == 0 and outcome[7.5, True].exit_code == 0
    assert outcome[0.5, True].exit_code != 0
    assert ("images/00000.png (1 image in all) was made at a CFG scale of 1 or less before trasce took the prompt's "
            "prediction alone there, as diffusers does; delete those images to make them again") in (
        outcome[0.5, True].output)


def test_a_rerun_of_a_finished_folder_says_so(tiny_sd_folder, tmp_path):
    args = ("generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--out", tmp_path / "out",
            *(a for a in BASE if a != "--quiet"))
    assert "already" not in _run(*args).output
    again = _run(*args)
    assert again.exit_code == 0
    assert f"generate: nothing to make; the 1 image asked for is in {tmp_path / 'out'} already" in again.output


def test_a_model_changed_under_its_name_is_not_mixed_into_a_resumed_run(tiny_sd_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from trasce.pipeline import model_revision

    moved = tmp_path / "moved"
    shutil.copytree(tiny_sd_folder, moved)  # the same files under another path
    (moved / "README.md").write_text("a model card: no image depends on it")
    assert model_revision(moved) == model_revision(tiny_sd_folder)
    out = tmp_path / "out"
    args = ("generate", "--out", out, *BASE)
    assert _run(*args, "--model", tiny_sd_folder, "--prompt", "a red apple").exit_code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["model_revision"] == model_revision(tiny_sd_folder) != model_revision("toy")
    (weights,) = (tiny_sd_folder / "unet").glob("*.safetensors")
    save_file({name: tensor * 1.1 for name, tensor in load_file(weights).items()}, weights)  # retrained in place
    result = CliRunner().invoke(main, [str(a) for a in (*args, "--model", tiny_sd_folder, "--prompt", "a red apple",
                                                        "--prompt", "a blue car")])
    assert result.exit_code == 2
    assert " ".join(result.output.split()).startswith(f"error: {out} holds a run with different settings: "
                                                      "'model_revision' was \"sha256:")
    assert len(_manifest(out)) == 1
    # The first model's files under their new path: the same model, and the run resumes.
    assert _run(*args, "--model", moved, "--prompt", "a red apple", "--prompt", "a blue car").exit_code == 0
    assert len(_manifest(out)) == 2
    # A run.json from before the revision was recorded resumes as it did, on the name alone.
    run["settings"].pop("model_revision")
    (out / "run.json").write_text(json.dumps(run))
    assert _run(*args, "--model", tiny_sd_folder, "--prompt", "a red apple", "--prompt", "a blue car",
                "--prompt", "a green pear").exit_code == 0
    assert len(_manifest(out)) == 3


def test_a_preset_made_for_another_model_is_warned_about(tiny_sd_folder, tmp_path):
    toy = _run("generate", "--prompt", "a red circle", "--preset", "nudity", "--out", tmp_path / "toy", "--steps", 1,
               "--quiet")
    assert toy.exit_code == 0
    assert ("warning: preset 'nudity' holds settings chosen for Stable Diffusion v1.4, not for this model (toy)"
            in toy.output)
    sd = _run("generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--preset", "toy-shape",
              "--out", tmp_path / "sd", *BASE)
    assert sd.exit_code == 0 and "preset 'toy-shape' holds settings chosen for the embedded model" in sd.output
    fitting = _run("generate", "--prompt", "a red circle", "--preset", "toy-shape", "--concept", "circle",
                   "--out", tmp_path / "fits", "--steps", 1, "--quiet")
    assert fitting.exit_code == 0 and "warning" not in fitting.output


def test_safety_checker_flag_on_a_model_without_one(tiny_sd_folder, tmp_path):
    result = _run("generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--out", tmp_path / "out",
                  "--safety-checker", *BASE)
    assert result.exit_code != 0
    assert ("--safety-checker: this model (StableDiffusionPipeline) has no safety checker to keep (among diffusers' "
            "pipelines, Stable Diffusion 1.x/2.x ones may carry one, if their folder ships it); leave the flag out") \
        in result.output


def test_a_hub_ids_safety_checker_is_not_loaded_when_left_out(tiny_sd, tmp_path, monkeypatch):
    """For a hub id, the model_index.json (from the cache) says what the pipeline holds before it loads."""
    from conftest import with_safety_checker
    from diffusers import DiffusionPipeline

    from trasce.pipeline import load_diffusers_pipeline

    folder = tmp_path / "cache-copy"
    with_safety_checker(tiny_sd, flags_every_image=True).save_pretrained(folder)
    given = []
    load, read = DiffusionPipeline.from_pretrained.__func__, DiffusionPipeline.load_config.__func__
    monkeypatch.setattr(DiffusionPipeline, "load_config", classmethod(
        lambda cls, name, **kwargs: read(cls, folder if name == "someone/sd" else name, **kwargs)))
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(
        lambda cls, name, **kwargs: given.append(kwargs) or load(cls, folder if name == "someone/sd" else name,
                                                                  **kwargs)))
    assert load_diffusers_pipeline("someone/sd", safety_checker=False).safety_checker is None
    assert given[-1]["safety_checker"] is None and given[-1]["requires_safety_checker"] is False
    assert load_diffusers_pipeline("someone/sd").safety_checker is not None
    assert "safety_checker" not in given[-1]


def test_same_seed_gives_same_image_in_any_batch_and_with_one_call(tiny_sd_folder, tmp_path):
    prompts = _write(tmp_path / "p.txt", "a red apple\na blue car\na green tree\n")
    one, three, fused = tmp_path / "one", tmp_path / "three", tmp_path / "fused"
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", one, "--batch-size", 1,
                *BASE).exit_code == 0
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", three, "--batch-size", 3,
                *BASE).exit_code == 0
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", fused, "--batch-size", 3,
                "--one-call", *BASE).exit_code == 0
    assert json.loads((fused / "run.json").read_text())["settings"]["one_call"] is True
    import numpy as np
    from PIL import Image

    for name in ("00000.png", "00001.png", "00002.png"):
        a = np.asarray(Image.open(one / "images" / name), dtype=float)
        for other in (three, fused):
            b = np.asarray(Image.open(other / "images" / name), dtype=float)
            assert np.abs(a - b).max() <= 1, (other.name, name)


def test_a_stochastic_scheduler_gives_the_same_image_in_any_batch(tiny_sd_folder, tmp_path):
    """euler-a adds noise at every step: it comes from each image's own generator, not torch's global one."""
    import numpy as np
    from PIL import Image

    prompts = _write(tmp_path / "p.txt", "a red apple\na blue car\na green tree\n")
    for name, batch, global_seed in (("one", 1, 0), ("three", 3, 1)):
        torch.manual_seed(global_seed)
        assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", tmp_path / name,
                    "--batch-size", batch, "--scheduler", "euler-a", *BASE).exit_code == 0
    assert json.loads((tmp_path / "one" / "run.json").read_text())["settings"]["scheduler"] == \
        "EulerAncestralDiscreteScheduler"
    for name in ("00000.png", "00001.png", "00002.png"):
        a, b = (np.asarray(Image.open(tmp_path / run / "images" / name), dtype=float) for run in ("one", "three"))
        assert np.abs(a - b).max() <= 1, name


def test_steer_window_limits_the_steered_steps(tiny_sd_folder, tmp_path):
    prompts = _write(tmp_path / "p.txt", "a red apple\na blue car\n")
    base = ("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--exact", *BASE, "--steps", 4)
    late, never, negation = tmp_path / "late", tmp_path / "never", tmp_path / "negation"
    assert _run(*base, "--out", late, "--steer-window", 0.5, 1).exit_code == 0
    assert _run(*base, "--out", never, "--steer-window", 0, 0).exit_code == 0
    assert _run(*base, "--out", negation, "--mode", "negation").exit_code == 0
    assert [r["steered_steps"] for r in _manifest(late)] == [2, 2]  # steps 2 and 3 of 0..3
    assert [r["steered_steps"] for r in _manifest(never)] == [0, 0]
    assert json.loads((late / "run.json").read_text())["settings"]["steer_window"] == [0.5, 1.0]
    assert _manifest(late)[0]["settings"]["steer_window"] == [0.5, 1.0]
    # never steering is part 1 alone
    for name in ("00000.png", "00001.png"):
        assert (never / "images" / name).read_bytes() == (negation / "images" / name).read_bytes()


@pytest.mark.slow
def test_generate_compiled_resumes_an_uncompiled_run_and_stops_on_a_wrong_gradient(tiny_sd_folder, tmp_path,
                                                                                   monkeypatch):
    import torch

    import trasce.pipeline
    from trasce import sampler

    prompts = _write(tmp_path / "p.txt", "a red apple\na blue car\n")
    out = tmp_path / "out"
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", out, "--end", 1,
                *BASE).exit_code == 0
    # aot_eager traces and differentiates the UNet as inductor does, in seconds and without its CPU bugs.
    compile_ = torch.compile
    monkeypatch.setattr(trasce.pipeline.torch, "compile", lambda module, **_: compile_(module, backend="aot_eager"))
    torch._dynamo.reset()
    monkeypatch.setattr(sampler.GradientCheck, "tolerance", -1.0)  # no gradient passes: the check fails
    result = CliRunner().invoke(main, [str(a) for a in ("generate", "--model", tiny_sd_folder, "--prompts", prompts,
                                                        "--out", out, "--compile", "default", *BASE)])
    assert result.exit_code == 2
    assert result.output.startswith("error: the compiled denoiser's backward pass differs from the uncompiled")
    assert [r["prompt"] for r in _manifest(out)] == ["a red apple"]  # nothing written with a wrong gradient
    monkeypatch.undo()
    asked = []  # torch.compile's arguments
    monkeypatch.setattr(trasce.pipeline.torch, "compile",
                        lambda module, **options: asked.append(options) or compile_(module, backend="aot_eager"))
    torch._dynamo.reset()
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", out, "--compile", "cudagraphs",
                *BASE).exit_code == 0  # the same images up to rounding: compiling does not block resuming
    assert asked == [{"backend": "cudagraphs", "dynamic": False}]
    assert [r["prompt"] for r in _manifest(out)] == ["a red apple", "a blue car"]
    torch._dynamo.reset()
    monkeypatch.undo()
    eager = tmp_path / "eager"
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", eager, *BASE).exit_code == 0
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(folder / "images" / "00001.png"), dtype=float) for folder in (out, eager))
    assert np.abs(a - b).max() <= 1


def test_killed_run_resumes_without_duplicates(tiny_sd_folder, tmp_path, monkeypatch):
    import trasce.generate as generate

    prompts = _write(tmp_path / "p.txt", "a red apple\na blue car\na green tree\n")
    out = tmp_path / "out"
    (tiny_sd_folder / "trasce_toy.json").write_text("{}")  # judged by the toy judge: a model of its world
    real_save, calls = generate.atomic_save_image, []

    def save_then_die(path, image):
        if calls:
            raise Killed  # the process is killed while the second image is being written
        calls.append(path)
        real_save(path, image)

    monkeypatch.setattr(generate, "atomic_save_image", save_then_die)
    with pytest.raises(Killed):
        _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", out, "--batch-size", 1, *BASE)
    assert [r["file"] for r in _manifest(out)] == ["images/00000.png"]
    # Judged now, the folder's numbers are over one image of three, and evaluate says so.
    judged = _run("evaluate", out, "--judge", "toy", "--quiet")
    assert judged.exit_code == 0 and judged.stderr == (
        f"warning: {out}: not complete: 2 of the 3 images the run expects are missing (first: images/00001.png); "
        "the numbers cover the 1 present; rerun the trasce generate or trasce benchmark command that made it "
        "to make the rest\n")
    monkeypatch.setattr(generate, "atomic_save_image", real_save)
    first = (out / "images" / "00000.png").stat().st_mtime_ns
    # a half-written file a killed process left two hours ago, and one another process is writing now
    stale, fresh = out / "images" / ".00001.png.abc.tmp", out / "images" / ".00002.png.def.tmp"
    stale.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", out, "--batch-size", 1,
                *BASE).exit_code == 0
    files = [r["file"] for r in _manifest(out)]
    assert files == ["images/00000.png", "images/00001.png", "images/00002.png"]
    assert (out / "images" / "00000.png").stat().st_mtime_ns == first  # not made again
    assert not stale.exists() and fresh.exists()
    # a third run has nothing left to do and changes nothing
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", prompts, "--out", out, *BASE).exit_code == 0
    assert [r["file"] for r in _manifest(out)] == files
    judged = _run("evaluate", out, "--judge", "toy", "--quiet")
    assert judged.exit_code == 0 and judged.stderr == ""
    assert json.loads((out / "summary-toy.json").read_text())["completeness"] == (
        "complete: all 3 images the run expects are present")


def test_changed_settings_into_same_folder_is_refused(tiny_sd_folder, tmp_path):
    out = tmp_path / "out"
    assert _run("generate", "--model", tiny_sd_folder, "--prompt", "a car", "--out", out, *BASE).exit_code == 0
    result = _run("generate", "--model", tiny_sd_folder, "--prompt", "a car", "--out", out, *BASE, "--sigma", 3)
    assert result.exit_code == 2
    assert "'sigma' was 1.0, now 3.0" in result.output and "--overwrite" in result.output
    (out / "run.json").unlink()  # lost, or not copied: the image's settings cannot be checked any more
    result = _run("generate", "--model", tiny_sd_folder, "--prompt", "a car", "--out", out, *BASE, "--sigma", 3)
    assert result.exit_code == 2 and f"error: {out} holds 1 finished image (manifest.jsonl) but no run.json" in (
        result.output)
    assert not (out / "run.json").exists()

    # --overwrite starts afresh: the old image and the verdicts about it are gone, the new image is made
    assert _run("evaluate", out, "--judge", "toy", "--quiet").exit_code == 0
    assert (out / "verdicts-toy.jsonl").is_file() and (out / "summary-toy.json").is_file()
    old = (out / "images" / "00000.png").read_bytes()
    result = _run("generate", "--model", tiny_sd_folder, "--prompt", "a car", "--out", out, *BASE, "--sigma", 3,
                  "--exact", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "verdicts-toy.jsonl").exists() and not (out / "summary-toy.json").exists()
    assert (out / "images" / "00000.png").read_bytes() != old and len(_manifest(out)) == 1
    assert json.loads((out / "run.json").read_text())["settings"]["sigma"] == 3.0


def test_resume_holds_each_done_image_to_its_row_not_the_file_path(tiny_sd_folder, tmp_path):
    out = tmp_path / "out"
    first = _write(tmp_path / "p.csv", "case_number,prompt,evaluation_seed\n1,a red apple,1\n2,a blue car,2\n")
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", first, "--out", out, *BASE).exit_code == 0
    made = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in _manifest(out)}

    # The same rows from another path, plus a new row: only the new row is generated.
    (tmp_path / "copy").mkdir()
    longer = _write(tmp_path / "copy" / "p.csv", first.read_text() + "3,a green tree,3\n")
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", longer, "--out", out, *BASE).exit_code == 0
    assert [r["file"] for r in _manifest(out)] == ["images/1.png", "images/2.png", "images/3.png"]
    assert all((out / file).stat().st_mtime_ns == mtime for file, mtime in made.items())

    # A row whose prompt or seed changed since its image was made is refused, naming the row.
    for edited, now in (("2,a blue bus,2", "'a blue bus' (seed 2, CFG 7.5)"),
                        ("2,a blue car,5", "'a blue car' (seed 5, CFG 7.5)")):
        longer.write_text(first.read_text().replace("2,a blue car,2", edited))
        result = _run("generate", "--model", tiny_sd_folder, "--prompts", longer, "--out", out, *BASE)
        assert result.exit_code == 2
        assert (f"images/2.png was made from prompt 'a blue car' (seed 2, CFG 7.5), but row 3 of {longer} (case 2) "
                f"now gives {now}; use a new output folder, or delete that image to make it again from the row as it "
                "is now, or --overwrite to discard the images already made") in result.output
    assert len(_manifest(out)) == 3
    # ... and so is a source that lacks a done image's row (another file, or --prompt instead of --prompts).
    other = _write(tmp_path / "other.csv", "case_number,prompt,evaluation_seed\n2,a blue car,2\n")
    result = _run("generate", "--model", tiny_sd_folder, "--prompts", other, "--out", out, *BASE)
    assert result.exit_code == 2
    assert (f"images/1.png was made from prompt 'a red apple' (seed 1, CFG 7.5), which is in none of the rows of "
            f"{other}; use a new output folder, or one prompt file that holds every row (--start/--end take a part "
            "of it), or --overwrite to discard the images already made") in result.output
    result = _run("generate", "--model", tiny_sd_folder, "--prompt", "a red apple", "--out", out, *BASE)
    assert result.exit_code == 2 and "which is in none of the rows of the --prompt values" in result.output
    # As the message says, an image deleted is made again from its row as it is now; the others are kept.
    longer.write_text(first.read_text().replace("2,a blue car,2", "2,a blue bus,2") + "3,a green tree,3\n")
    (out / "images" / "2.png").unlink()
    assert _run("generate", "--model", tiny_sd_folder, "--prompts", longer, "--out", out, *BASE).exit_code == 0
    assert {r["file"]: r["prompt"] for r in _manifest(out)}["images/2.png"] == "a blue bus"
    assert (out / "images" / "1.png").stat().st_mtime_ns == made["images/1.png"]


def test_api_refuses_a_seed_past_2_to_the_32_without_a_prompt_file(tmp_path):
    from trasce.generate import GenerateOptions, read_rows

    with pytest.raises(ValueError) as info:
        read_rows(GenerateOptions(out=tmp_path, prompt=["a car"], seed=2**32), 7.5)
    assert str(info.value) == "--seed 4294967296 is out of range; seeds must be between 0 and 4294967295 (2**32 - 1)"


def test_every_problem_of_a_prompt_file_is_shown_up_to_twenty(tmp_path):
    out = tmp_path / "out"
    two = _write(tmp_path / "two.csv", "prompt,evaluation_seed\na car,x\n,2\n")
    result = _run("generate", "--prompts", two, "--out", out, "--quiet")
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: {two}, row 2, column 'evaluation_seed': 'x' is not an integer seed",
        f"error: {two}, row 3, column 'prompt': '' is an empty prompt",
    ]
    many = _write(tmp_path / "many.csv", "prompt,evaluation_seed\n" + "".join(f"car {i},s{i}\n" for i in range(23)))
    lines = _run("generate", "--prompts", many, "--out", out, "--quiet").output.splitlines()
    assert lines[:2] == [f"error: {many}, row 2, column 'evaluation_seed': 's0' is not an integer seed",
                         f"error: {many}, row 3, column 'evaluation_seed': 's1' is not an integer seed"]
    assert len(lines) == 21 and lines[19].startswith(f"error: {many}, row 21, column 'evaluation_seed': 's19'")
    assert lines[20] == "error: ... and 3 more problems in this file"
    assert not out.exists()


@pytest.mark.parametrize("content, args, message", [
    (None, ("--prompts", "{tmp}/missing.csv"), "missing.csv"),
    ("text,id\nhello,1\n", (), "no prompt column; expected one of 'prompt', 'adv_prompt', 'sensitive prompt'"),
    ("prompt,evaluation_seed\na car,1\n\" \",2\n", (), "row 3, column 'prompt': ' ' is an empty prompt"),
    ("prompt,evaluation_seed\na car,abc\n", (), "row 2, column 'evaluation_seed': 'abc'"),
    ("prompt,evaluation_guidance\na car,high\n", (), "row 2, column 'evaluation_guidance': 'high'"),
    ("prompt\na car\n", ("--preset", "nudes"), "'nudes' is not one of"),
    ("prompt\na car\n", ("--mode", "erase"), "'erase' is not one of"),
    ("prompt\na car\n", ("--scheduler", "heun"), "'heun' is not one of"),
    ("prompt\na car\n", ("--dtype", "fp8"), "'fp8' is not one of"),
    ("prompt\na car\n", ("--height", 60), "--height must be a positive multiple of 8, got 60"),
    ("prompt\na car\n", ("--batch-size", 0), "--batch-size must be at least 1, got 0"),
    ("prompt\na car\n", ("--images-per-prompt", 0), "--images-per-prompt must be at least 1, got 0"),
    ("prompt\na car\n", ("--sigma", 0), "sigma must be a positive finite number, got 0.0"),
    ("prompt\na car\n", ("--sigma", "nan"), "sigma must be a positive finite number, got nan"),
    ("prompt\na car\n", ("--step-size", "nan"), "step_size must be a finite number, got nan"),
    ("prompt\na car\n", ("--loss-scale", "inf"), "loss_scale must be a finite number, got inf"),
    ("prompt\na car\n", ("--steps", 5000), "--steps 5000: "),
    ("prompt\na car\n", ("--scheduler", "pndm"), "PNDMScheduler is not among the schedulers known to step from"),
    ("prompt\na car\n", ("--seed", 2**32),
     "Invalid value for '--seed': 4294967296 is not in the range 0<=x<=4294967295"),
    ("prompt\na car\n", ("--start", -1), "Invalid value for '--start': -1 is not in the range x>=0"),
    ("prompt\na car\n", ("--steer-window", 0.5, 0.2),
     "--steer-window must be START END with 0 <= START <= END <= 1 (fractions of the steps), got 0.5 0.2"),
    ("prompt\na car\n", ("--lazy-tolerance", -1), "--lazy-tolerance must be at least 0 (or give --exact), got -1"),
    ("prompt\na car\n", ("--seed", -1), "Invalid value for '--seed': -1 is not in the range 0<=x<="),
    ("prompt\na car\nbus\n", ("--start", 2), "--start 2 selects none of the 2 prompts of "),
    ("prompt\na car\n", ("--steps", 0), "--steps must be at least 1, got 0"),
    ("prompt\na car\n", ("--steps", -3), "--steps must be at least 1, got -3"),
    (None, ("--prompt", "a car", "--guidance-scale", "nan"), "--guidance-scale must be a finite number, got nan"),
    ("prompt\na car\n", ("--device", "bogus"), "unknown device 'bogus'; expected auto, cpu, cuda, cuda:N or mps"),
    pytest.param("prompt\na car\n", ("--device", "cuda"), "device 'cuda' is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (None, ("--prompt", "a car", "--prompt", " "), "--prompt number 2 is empty"),
    ("prompt\na car\n", ("--model", "{tmp}"), "is not a diffusers pipeline folder (no model_index.json)"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_sd_folder, tmp_path, content, args, message):
    prompts = tmp_path / "prompts.csv"
    if content is not None:
        prompts.write_text(content)
    out = tmp_path / "out"
    files = [] if "--prompts" in args or "--prompt" in args else ["--prompts", prompts]
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    model = [] if "--model" in args else ["--model", tiny_sd_folder]
    result = CliRunner().invoke(main, ["generate", *map(str, model + files), "--out", str(out), "--concept", "x",
                                       "--steps", "1", "--quiet", *args])  # args last: they win
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: "), result.output
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--prompt", "a", "--preset", "foo"],
     "error: Invalid value for '--preset': 'foo' is not one of 'nudity', "),
    (["generate", "--prompt", "a", "--dtype", "fp8"], "error: Invalid value for '--dtype': 'fp8' is not one of "),
    (["generate", "--prompt", "a", "--steps", "many"], "error: Invalid value for '--steps': 'many' is not a valid"),
    (["generate", "--prompt", "a", "--no-such-option"], "error: No such option '--no-such-option'"),
    (["generat"], "error: No such command 'generat'"),
])
def test_usage_errors_are_one_line_with_where_to_look(tmp_path, args, message):
    out = ["--out", str(tmp_path / "out")] if args[0] == "generate" else []
    result = CliRunner().invoke(main, args + out, prog_name="trasce")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    help_command = "trasce generate --help" if args[0] == "generate" else "trasce --help"
    assert result.output.strip().endswith(f"(see {help_command})")
    assert not (tmp_path / "out").exists()


def test_generate_without_prompts_says_what_to_give(tiny_sd_folder, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", tiny_sd_folder, "--out", str(tmp_path / "out"),
                                       "--concept", "x", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "nothing to generate: give --prompt TEXT or --prompts FILE" in result.output


def test_the_cli_drops_transformers_advice_to_install_torchvision():
    import logging

    logger = logging.getLogger("transformers.utils.import_utils")
    CliRunner().invoke(main, ["demo", "--help"])
    advice = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "`CLIPImageProcessor` requires torchvision "
                               "(not installed); falling back to `CLIPImageProcessorPil` ...", (), None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something else", (), None)
    assert not logger.filter(advice) and logger.filter(other)


def test_an_image_that_overflowed_is_refused_with_its_row_and_the_others_kept(tmp_path):
    # CFG 1e30 overflows to NaN; diffusers would save it black, and a judge would count it (a nudity judge: erased).
    prompts = _write(tmp_path / "p.csv", "case_number,prompt,evaluation_seed,evaluation_guidance\n"
                                         "1,a red circle,1,1e30\n2,a blue star,2,1.5\n3,a green square,3,1.5\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--prompts", str(prompts), "--out", str(out), "--concept", "circle",
                                       "--steps", "2", "--batch-size", "2", "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: case '1' ('a red circle', seed 1, CFG 1e+30, line 2 of {prompts}): its "
                                    "final latent holds NaN or inf"), result.output
    # Case 2 shared the batch and was saved; case 3's batch never ran.
    assert [r["case"] for r in _manifest(out)] == ["2"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["2.png"]


@pytest.mark.parametrize("args, message", [
    (["bench", "--model", "toy", "--steps", "1", "--json", "{tmp}/run"],
     "--json {tmp}/run is a folder; give a file's path"),
    (["bench", "--model", "toy", "--steps", "1", "--json", "{tmp}/afile/x.json"],
     "--json {tmp}/afile/x.json: {tmp}/afile is a file, not a folder"),
    (["table", "{tmp}/run", "--label", "toy", "--markdown", "{tmp}/run"],
     "--markdown {tmp}/run is a folder; give a file's path"),
    (["table", "{tmp}/run", "--label", "toy", "--html", "{tmp}/afile/t.html"],
     "--html {tmp}/afile/t.html: {tmp}/afile is a file"),
    (["train-toy", "--out", "{tmp}/afile"], "--out {tmp}/afile is a file; give a folder"),
    (["train-toy", "--out", "{tmp}/x", "--minutes", "-1"],
     "Invalid value for '--minutes': -1.0 is not in the range x>0"),
    (["generate", "--prompt", "a", "--concept", "circle", "--out", "{tmp}/afile/sub"],
     "--out {tmp}/afile/sub: {tmp}/afile is a file, not a folder"),
    (["generate", "--prompt", "a", "--concept", "circle", "--out", "{tmp}/run/sub"],
     "--out {tmp}/run/sub lies inside {tmp}/run, another run's folder; give trasce generate a folder of its own"),
    (["generate", "--prompt", "a", "--concept", "circle", "--out", "{tmp}"],
     "--out {tmp} holds other runs' folders (run); give trasce generate a folder of its own"),
    (["demo", "--out", "{tmp}/run"], "--out {tmp}/run holds a single run (trasce generate's or attack's); trasce demo "
                                     "writes a folder per method in it: give it a folder of its own"),
    (["benchmark", "--concept", "circle", "--out", "{tmp}/run"], "trasce benchmark writes a folder per method in it"),
    (["attack", "--concept", "circle", "--out", "{tmp}/run/attack"], "lies inside {tmp}/run, another run's folder"),
])
def test_an_output_path_that_cannot_be_used_is_refused_before_any_work(tmp_path, args, message):
    # One finished generate run, and a file where a folder is wanted.
    run = tmp_path / "run"
    assert _run("generate", "--prompt", "a red circle", "--concept", "circle", "--steps", 1, "--out", run,
                "--quiet").exit_code == 0
    (tmp_path / "afile").write_text("not a folder")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert message.replace("{tmp}", str(tmp_path)) in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_command_shows_trasce_warnings_as_one_line(tmp_path):
    # A manifest line damaged in the middle (a crash, then a resumed run) is warned of at every reading.
    out = tmp_path / "out"
    assert _run("generate", "--prompt", "a red circle", "--prompt", "a blue star", "--concept", "circle",
                "--steps", 1, "--out", out, "--quiet").exit_code == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join([lines[0], lines[1][:30], lines[1]]) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "trasce", "evaluate", str(out), "--judge", "toy", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    warned = [line for line in result.stderr.splitlines() if "unreadable line" in line]
    assert warned == [f"warning: {out / 'manifest.jsonl'}: skipped 1 unreadable line(s) (first: line 2), as a crash "
                      "leaves them; an image such a line recorded counts as made only where a later line records it "
                      "again (trasce generate makes the others again); this warning comes at every reading until "
                      "the line is deleted"], result.stderr[-2000:]
    assert "RuntimeWarning" not in result.stderr and "read_manifest()" not in result.stderr
