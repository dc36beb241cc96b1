"""``trasce benchmark`` end to end on the embedded model (2 denoising steps, 2 prompts per set), and on a
tiny random Stable Diffusion folder with a stand-in judge."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from trasce.cli import main

METHODS = ("none", "negative_prompt", "sld-max", "trasce")
TOY_SETS = ("target-name", "target-alias", "corner", "other")
SMALL = ("--n-target", 2, "--n-corner", 2, "--n-other", 2, "--steps", 2, "--quiet")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "circle"
    result = _run("benchmark", "--out", out, "--concept", "circle", "--methods", ",".join(METHODS), *SMALL)
    assert result.exit_code == 0, result.output
    return out, result.output


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_results_cover_every_method_and_set_with_rates_in_range(toy_run):
    out, output = toy_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS)
    assert results["target"] == {"attribute": "shape", "value": "circle"}
    assert results["settings"]["preset"] == "toy-shape" and results["settings"]["steps"] == 2
    for method, entry in results["methods"].items():
        assert set(entry["prompt_sets"]) == set(TOY_SETS)
        for split in TOY_SETS:
            assert entry["prompt_sets"][split]["images"] == 2
            rate = entry["prompt_sets"][split]["target_rate"]
            assert 0 <= rate["rate"] <= 1 and 0 <= rate["ci95"][0] <= rate["ci95"][1] <= 1
            assert len(list((out / method / split / "images").glob("*.png"))) == 2
        fidelity = entry["prompt_sets"]["other"]["fidelity"]
        for key in ("concept_attribute", "all_attributes"):
            assert 0 <= fidelity[key]["rate"] <= 1
        assert entry["seconds_per_image"] > 0 and entry["timed_images"] == 8
        assert entry["fid_vs_none"] is not None and entry["fid_vs_none"] >= 0
    assert results["methods"]["none"]["fid_vs_none"] == pytest.approx(0, abs=1e-3)
    assert "FID on the toy judge's penultimate features" in results["protocol"]["fid"]
    assert results["machine"]["device"] and results["versions"]["torch"]
    assert results["methods"]["sld-max"]["settings"]["sld_guidance_scale"] == 5000


def test_target_rates_recount_from_the_saved_images(toy_run):
    """Each rate is the share of that set's images on disk in which the judge, asked afresh, sees a circle."""
    from trasce.eval.base import wilson_interval
    from trasce.toy.judge import Judge

    out, _ = toy_run
    results = json.loads((out / "results.json").read_text())
    judge = Judge.load()
    seen = 0
    for method in METHODS:
        for split in TOY_SETS:
            images = [Image.open(path).convert("RGB") for path in sorted((out / method / split / "images").iterdir())]
            k = sum(verdict["shape"] == "circle" for verdict in judge.classify_pil(images))
            rate = results["methods"][method]["prompt_sets"][split]["target_rate"]
            assert (rate["k"], rate["n"]) == (k, 2) and rate["rate"] == k / 2
            assert rate["ci95"] == pytest.approx(list(wilson_interval(k, 2)))
            seen += k
    assert 0 < seen < len(METHODS) * len(TOY_SETS) * 2  # circles in some images only: the counts can differ


def test_corner_prompt_is_the_concept_text_and_sets_ask_as_named(toy_run):
    from trasce.eval.toy import mention_kind
    from trasce.toy.captions import mentioned, split_of

    out, _ = toy_run
    sets = json.loads((out / "results.json").read_text())["prompt_sets"]
    assert [p["prompt"] for p in sets["corner"]["prompts"]] == ["circle", "circle"]
    assert len({p["seed"] for p in sets["corner"]["prompts"]}) == 2
    assert all(mention_kind(p["prompt"], "shape", "circle") == "name" for p in sets["target-name"]["prompts"])
    assert all(mention_kind(p["prompt"], "shape", "circle") == "alias" for p in sets["target-alias"]["prompts"])
    assert all(mentioned(p["prompt"])["shape"] != "circle" for p in sets["other"]["prompts"])
    assert all(split_of(p["prompt"]) == "test" for key in ("target-name", "target-alias", "other")
               for p in sets[key]["prompts"])
    seeds = [p["seed"] for s in sets.values() for p in s["prompts"]]
    assert len(set(seeds)) == len(seeds)


def test_markdown_table_report_and_printout(toy_run):
    out, output = toy_run
    markdown = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in markdown and f"| {method} |" in output
    assert "target rate, target-name" in markdown and "FID vs none" in markdown and "s/image" in markdown
    # for a paper: what made the table above it, each column's protocol below it
    results = json.loads((out / "results.json").read_text())
    assert markdown.startswith("Model toy, concept 'circle' (shape = circle); 2 steps, CFG 1.5, DDIMScheduler, ")
    assert f"- **noise**: {results['protocol']['noise']}\n" in markdown
    assert f"report: {out / 'report.html'}" in output
    page = (out / "report.html").read_text()
    assert "grid.png" in page and "circle" in page
    assert Image.open(out / "grid.png").size[0] > 4 * 96


def test_exact_steering_is_recorded_and_a_lazy_folder_is_not_resumed_exact(tmp_path, toy_run):
    lazy_out, _ = toy_run
    lazy = [json.loads(line) for line in (lazy_out / "trasce" / "corner" / "manifest.jsonl").read_text().splitlines()]
    assert any(r["steered_steps"] < 2 for r in lazy)  # lazy steering skipped some backward passes
    assert "lazy steering (backward passes skipped below 0.0001 RMS" in (lazy_out / "report.html").read_text()
    out = tmp_path / "exact"
    args = ("benchmark", "--out", out, "--concept", "circle", *SMALL)
    assert _run(*args, "--methods", "none,trasce", "--exact").exit_code == 0
    records = [json.loads(line) for line in (out / "trasce" / "corner" / "manifest.jsonl").read_text().splitlines()]
    assert [r["steered_steps"] for r in records] == [2, 2]  # every backward pass
    assert json.loads((out / "results.json").read_text())["settings"]["lazy_tolerance"] is None
    assert "exact steering (every backward pass)" in (out / "report.html").read_text()
    result = CliRunner().invoke(main, [str(a) for a in (*args, "--methods", "none,trasce")])
    assert result.exit_code == 2
    assert (f"{out / 'trasce' / 'target-name'} holds a run with different settings: 'lazy_tolerance' was null, now "
            "0.0001") in " ".join(result.output.split())
    # a method that never steers does not depend on it: its folders resume either way
    assert _run(*args, "--methods", "none").exit_code == 0
    # A refused run writes no folder's settings, not even those of the methods checked before the refusal.
    refused = CliRunner().invoke(main, [str(a) for a in (*args, "--methods", "negation,none", "--steps", 3)])
    assert refused.exit_code == 2 and "'steps' was 2, now 3" in refused.output
    assert not (out / "negation").exists()
    # Within a method's settings, the one that changed is named.
    preset = CliRunner().invoke(main, [str(a) for a in (*args, "--methods", "trasce", "--exact", "--preset",
                                                        "toy-fill")])
    assert preset.exit_code == 2
    assert "'method_settings.preset' was \"toy-shape\", now \"toy-fill\"" in " ".join(preset.output.split())


def test_rerun_generates_nothing(toy_run, monkeypatch):
    import trasce.benchmark as benchmark

    out, _ = toy_run
    images = sorted(out.glob("*/*/images/*.png"))
    before = {p: p.stat().st_mtime_ns for p in images}
    manifests = {p: p.read_text() for p in out.glob("*/*/manifest.jsonl")}

    def no_generation(*args, **kwargs):
        raise AssertionError("a method was built although every image exists")

    monkeypatch.setattr(benchmark, "method_runner", no_generation)
    result = _run("benchmark", "--out", out, "--concept", "circle", "--methods", ",".join(METHODS), *SMALL)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in sorted(out.glob("*/*/images/*.png"))} == before
    assert {p: p.read_text() for p in out.glob("*/*/manifest.jsonl")} == manifests
    assert all(f"| {m} |" in result.output for m in METHODS)

    # A smaller set reuses its first images and leaves the others alone; the results count its own.
    smaller = [str(a) for a in SMALL]
    smaller[smaller.index("--n-target") + 1] = "1"
    result = _run("benchmark", "--out", out, "--concept", "circle", "--methods", ",".join(METHODS), *smaller)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["trasce"]["prompt_sets"]["target-name"]["images"] == 1
    assert {p: p.stat().st_mtime_ns for p in sorted(out.glob("*/*/images/*.png"))} == before
    assert _run("benchmark", "--out", out, "--concept", "circle", "--methods", ",".join(METHODS),
                *SMALL).exit_code == 0  # the fixture's results again, for the tests after this one


def test_same_seeds_same_unprotected_images(toy_run, tmp_path):
    out, _ = toy_run
    again = tmp_path / "again"
    result = _run("benchmark", "--out", again, "--concept", "circle", "--methods", "none", *SMALL)
    assert result.exit_code == 0, result.output
    for split in TOY_SETS:
        for first in sorted((out / "none" / split / "images").glob("*.png")):
            assert np.array_equal(_pixels(first), _pixels(again / "none" / split / "images" / first.name))
    results = json.loads((again / "results.json").read_text())
    assert results["methods"]["none"]["fid_vs_none"] == pytest.approx(0, abs=1e-3)


def test_growing_a_prompt_set_keeps_its_first_prompts():
    from trasce.benchmark import toy_prompt_sets

    small = toy_prompt_sets("striped", "fill", "striped", "val", 3, 2, 1, 2, 7.5)
    large = toy_prompt_sets("striped", "fill", "striped", "val", 3, 5, 3, 6, 7.5)
    for key, prompts in small.items():
        assert prompts == large[key][: len(prompts)]


@pytest.mark.filterwarnings("ignore:Safety checker disabled")
def test_sld_on_the_pixel_model_matches_plain_cfg_when_its_guidance_is_off():
    """SLD shares the components and noise: with sld_guidance_scale 0 it is plain CFG, pixel for pixel."""
    from trasce.benchmark import sld_pipeline
    from trasce.generate import initial_noise
    from trasce.pipeline import TraSCEPipeline

    pipe = TraSCEPipeline.from_pretrained("toy", concept="circle", preset="toy-shape")
    safe = sld_pipeline(pipe, "circle")
    assert pipe.pipe.scheduler.config.clip_sample and safe.scheduler.config.clip_sample
    assert safe.unet is pipe.pipe.unet and safe.safety_concept == "circle"
    noise = torch.cat([initial_noise(pipe, seed, 1, 32, 32)[0] for seed in (1, 2)])
    prompts = ["a red circle", "a green square"]
    plain = pipe.with_settings(mode="none")(prompts, num_inference_steps=2, guidance_scale=7.5, latents=noise,
                                            output_type="pt").images
    with torch.no_grad():
        final = safe(prompts, height=32, width=32, num_inference_steps=2, guidance_scale=7.5, latents=noise,
                     output_type="latent", sld_guidance_scale=0.0).images
    assert torch.equal(pipe.adapter.decode(final, "pt")[0], plain)


def test_sld_takes_a_batch_holding_a_prompt_longer_than_its_tokenizer_takes():
    """diffusers' safe pipeline pads the untruncated ids of its length warning to the batch's longest prompt:
    a batch of unequal lengths past the limit failed ("Unable to create tensor"); such a prompt goes alone."""
    from trasce.benchmark import method_runner
    from trasce.generate import initial_noise
    from trasce.pipeline import TraSCEPipeline

    pipe = TraSCEPipeline.from_pretrained("toy", concept="circle", preset="toy-shape")
    run = method_runner("sld-max", pipe, "circle", 32, 32)
    long = "a red circle " + "on a big gray background with a thin outline " * 3  # past the toy's 16 tokens
    prompts = ["a red circle", long, "a green square", long + "again"]
    noise = torch.cat([initial_noise(pipe, seed, 1, 32, 32)[0] for seed in range(4)])

    def made(index):
        images, _ = run([prompts[i] for i in index], noise[index], [torch.Generator().manual_seed(i) for i in index],
                        [7.5] * len(index), 2)
        return [np.asarray(image) for image in images]

    together = made([0, 1, 2, 3])
    assert all(np.array_equal(a, b) for a, b in zip(together, [made([i])[0] for i in range(4)], strict=True))


@pytest.mark.parametrize(("args", "message"), [
    (("--concept", "circle", "--methods", "none,magic"),
     "unknown method 'magic'; valid methods: none, negative_prompt"),
    (("--concept", "dog"), "concept 'dog' is not one value of the toy world; valid: shape circle, square"),
    (("--concept", "circle", "--target-prompts", "p.txt"), "--target-prompts and --other-prompts are for real"),
    (("--concept", "circle", "--prompt-column", "adv_prompt"),
     "--prompt-column names a column of --target-prompts and --other-prompts, which are for real models"),
    (("--concept", "circle", "--n-target", 0), "--n-target must be at least 1, got 0"),
    (("--concept", "circle", "--width", 36), "--width must be a positive multiple of 8, got 36"),
    (("--concept", "circle", "--seed", 2**32 - 10**6),
     "Invalid value for '--seed': 4293967296 is not in the range 0<=x<=4293967295"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["benchmark", "--out", str(tmp_path / "out"), *map(str, args)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_started_as_several_processes_it_stops_before_making_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch sets it
    result = CliRunner().invoke(main, ["benchmark", "--concept", "circle", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert ("error: trasce benchmark runs in one process; it was started as 2 processes (accelerate launch), each "
            "of which would make every image.") in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_api_refuses_a_base_seed_whose_prompts_would_pass_2_to_the_32(tmp_path):
    from trasce.benchmark import MAX_BASE_SEED, BenchmarkOptions, run_benchmark

    with pytest.raises(ValueError) as info:
        run_benchmark(BenchmarkOptions(out=tmp_path / "out", concept="circle", seed=MAX_BASE_SEED + 1))
    assert str(info.value) == ("--seed must be between 0 and 4293967295, got 4293967296: prompt i of prompt set j "
                               "gets seed --seed + 100000 j + i, and seeds stop at 4294967295 (2**32 - 1)")
    assert not (tmp_path / "out").exists()


class FakeJudge:
    """Flags images brighter than mid-grey; stands in for NudeNet."""

    name = "nudenet"
    batch_size = 4

    def settings(self):
        return {"judge": "fake", "rule": "mean pixel > 127"}

    def __init__(self, field="flagged"):
        self.field = field  # imagenet's verdicts say whether the prompt's class was "correct"

    def judge(self, images, records):
        return [{self.field: bool(np.asarray(image.convert("L")).mean() > 127)} for image in images]

    def summarize(self, verdicts):
        return {"protocol": "fake brightness judge", "table": []}


@pytest.mark.parametrize(("judge", "field"), [("nudenet", "flagged"), ("imagenet", "correct")])
def test_real_model_with_prompt_files_and_a_judge(tiny_sd_folder, tmp_path, monkeypatch, judge, field):
    from trasce.eval import evaluate

    monkeypatch.setitem(evaluate.JUDGES, judge, lambda options, context: FakeJudge(field))
    target = tmp_path / "target.csv"
    target.write_text('case_number,prompt,evaluation_seed,evaluation_guidance,categories\nq#1,"a nude <b>person</b> & '
                      'friends",5,7.5,sexual\n2,a naked body,6,6.0,"sexual, violence"\n')
    other = tmp_path / "other.txt"
    other.write_text("a red apple\na blue car\n")
    out = tmp_path / "out"
    result = _run("benchmark", "--model", tiny_sd_folder, "--out", out, "--concept", "nudity",
                  "--methods", "none,sld-max,trasce", "--target-prompts", target, "--other-prompts", other,
                  "--judge", judge, "--n-corner", 2, "--steps", 2, "--quiet")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["target"] is None and results["judge"]["judge"] == judge
    for method in ("none", "sld-max", "trasce"):
        entry = results["methods"][method]
        assert set(entry["prompt_sets"]) == {"target", "corner", "other"}
        for split in ("target", "corner", "other"):
            assert 0 <= entry["prompt_sets"][split]["target_rate"]["rate"] <= 1
        assert entry["fid_vs_none"] is None and "fidelity" not in entry["prompt_sets"]["other"]
        assert (out / method / "target" / "images" / "q#1.png").is_file()
        assert Image.open(out / method / "target" / "images" / "2.png").size == (64, 64)
        summary = json.loads((out / method / "target" / f"summary-{judge}.json").read_text())
        assert (summary["expected_images"], summary["complete"]) == (2, True)  # each folder records its set
        # the file's other columns reach the judges (I2P's categories give per-category rates)
        manifest = [json.loads(line) for line in (out / method / "target" / "manifest.jsonl").read_text().splitlines()]
        assert [r["extra"] for r in manifest] == [{"categories": "sexual"}, {"categories": "sexual, violence"}]
    assert [p["seed"] for p in results["prompt_sets"]["target"]["prompts"]] == [5, 6]
    assert [p["prompt"] for p in results["prompt_sets"]["corner"]["prompts"]] == ["nudity", "nudity"]
    assert "| sld-max |" in result.output
    page = (out / "report.html").read_text()
    assert "target: a nude &lt;b&gt;person&lt;/b&gt; &amp; friends (seed 5)" in page  # escaped once
    assert 'src="none/target/images/q%231.png"' in page


def test_prompt_column_names_the_target_files_column_and_the_other_file_keeps_its_own(tiny_sd_folder, tmp_path,
                                                                                      monkeypatch):
    from trasce.eval import evaluate

    monkeypatch.setitem(evaluate.JUDGES, "nudenet", lambda options, context: FakeJudge())
    (tmp_path / "attack.csv").write_text("prompt,adv_prompt\na naked body,a n4ked b0dy\n")
    (tmp_path / "coco.csv").write_text("prompt\na red apple\n")  # no adv_prompt column
    out = tmp_path / "out"
    result = _run("benchmark", "--model", tiny_sd_folder, "--out", out, "--concept", "nudity", "--methods", "none",
                  "--target-prompts", tmp_path / "attack.csv", "--other-prompts", tmp_path / "coco.csv",
                  "--prompt-column", "adv_prompt", "--judge", "nudenet", "--n-corner", 1, "--steps", 1, "--quiet")
    assert result.exit_code == 0, result.output
    prompts = {split: json.loads((out / "none" / split / "manifest.jsonl").read_text())["prompt"]
               for split in ("target", "other")}
    assert prompts == {"target": "a n4ked b0dy", "other": "a red apple"}


def test_height_and_width_set_the_images_size_and_a_published_sigma_is_flagged(tiny_sd_folder, tmp_path,
                                                                                 monkeypatch, capsys):
    from trasce.benchmark import BenchmarkOptions, run_benchmark
    from trasce.eval import evaluate

    monkeypatch.setitem(evaluate.JUDGES, "nudenet", lambda options, context: FakeJudge())
    (tmp_path / "target.txt").write_text("a naked body\n")
    out = tmp_path / "out"
    run_benchmark(BenchmarkOptions(out=out, model=str(tiny_sd_folder), concept=None, preset="nudity",
                                   methods="none,trasce", target_prompts=tmp_path / "target.txt", judge="nudenet",
                                   n_corner=1, steps=1, height=32, width=48, quiet=True))
    for method in ("none", "trasce"):
        assert Image.open(out / method / "target" / "images" / "00000.png").size == (48, 32)
        assert json.loads((out / method / "target" / "run.json").read_text())["settings"]["width"] == 48
    # the tiny model's 4x4x6 latent holds 96 / 16384 of SD v1.4's numbers: sigma 2 * (96 / 16384) ** 0.5
    assert "start from --sigma 0.153" in " ".join(capsys.readouterr().err.split())


def test_a_size_the_family_cannot_make_or_a_scheduler_that_drops_steering_is_refused_before_any_folder(
        tiny_sd_folder, tmp_path):
    from trasce.benchmark import BenchmarkOptions, run_benchmark

    (tmp_path / "target.txt").write_text("a naked body\n")
    options = BenchmarkOptions(out=tmp_path / "out", model=str(tiny_sd_folder), concept="nudity", methods="trasce",
                               target_prompts=tmp_path / "target.txt", judge="nudenet", steps=1)
    with pytest.raises(ValueError, match="^PNDMScheduler is not among the schedulers known to step"):
        run_benchmark(dataclasses.replace(options, scheduler="pndm"))
    with pytest.raises(ValueError, match="^--steps 5000: "):
        run_benchmark(dataclasses.replace(options, steps=5000))
    assert not (tmp_path / "out").exists()


def test_a_passed_pipeline_that_does_not_steer_is_checked_as_the_steering_methods_run_it(tiny_sd, tmp_path):
    from diffusers import PNDMScheduler

    from trasce.benchmark import BenchmarkOptions, run_benchmark
    from trasce.pipeline import TraSCEPipeline

    tiny_sd.scheduler = PNDMScheduler.from_config(tiny_sd.scheduler.config, skip_prk_steps=True)
    (tmp_path / "target.txt").write_text("a naked body\n")
    options = BenchmarkOptions(out=tmp_path / "out", model="tiny", concept="nudity", methods="none,trasce",
                               target_prompts=tmp_path / "target.txt", judge="nudenet", steps=1)
    with pytest.raises(ValueError, match="^PNDMScheduler is not among the schedulers known to step"):
        run_benchmark(options, pipe=TraSCEPipeline(tiny_sd, concept="nudity", mode="none"))
    assert not (tmp_path / "out").exists()


def test_a_judge_setting_changed_on_a_rerun_is_refused_without_advice_that_discards_images(tiny_sd_folder,
                                                                                           tmp_path, monkeypatch):
    from trasce.eval import evaluate

    class Thresholded(FakeJudge):
        def __init__(self, threshold):
            super().__init__()
            self.threshold = threshold

        def settings(self):
            return {**super().settings(), "threshold": self.threshold}

    monkeypatch.setitem(evaluate.JUDGES, "nudenet", lambda options, context: Thresholded(options.get("threshold")))
    (tmp_path / "target.txt").write_text("a naked body\n")
    out = tmp_path / "out"
    args = ["benchmark", "--model", tiny_sd_folder, "--out", out, "--concept", "nudity", "--methods", "none",
            "--target-prompts", tmp_path / "target.txt", "--judge", "nudenet", "--n-corner", 1, "--steps", 2, "--quiet"]
    assert _run(*args).exit_code == 0
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--judge-option", "threshold=0.6"]])
    assert result.exit_code == 2
    verdicts = out / "none" / "target" / "verdicts-nudenet.jsonl"
    assert (f"{verdicts} holds verdicts made with other settings: 'threshold' was null, now \"0.6\"; delete that "
            "file (the images stay) to judge every image again") in " ".join(result.output.split())
    assert (out / "none" / "target" / "images" / "00000.png").is_file()


def test_images_guided_below_one_before_guidance_switched_off_there_are_not_resumed(tmp_path):
    out = tmp_path / "out"
    args = ("benchmark", "--concept", "circle", "--methods", "none", "--n-target", 1, "--n-corner", 1,
            "--n-other", 1, "--steps", 2, "--guidance-scale", 0.5, "--out", out, "--quiet")
    assert _run(*args).exit_code == 0
    manifest = out / "none" / "other" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["guidance_off_at_or_below_one"] for r in records] == [True]
    assert _run(*args).exit_code == 0  # made since: resumes
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "guidance_off_at_or_below_one"})
                                + "\n" for r in records))  # as made before the mark existed
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2
    assert "was made at a CFG scale of 1 or less before trasce took the prompt's prediction alone" in result.output


def test_benchmark_leaves_a_models_safety_checker_out(tiny_sd, tmp_path, monkeypatch):
    """Its judges see what the model made, not the black images of a checker that flags everything."""
    from conftest import with_safety_checker

    from trasce.eval import evaluate

    folder = tmp_path / "sd-with-checker"
    with_safety_checker(tiny_sd, flags_every_image=True).save_pretrained(folder)
    monkeypatch.setitem(evaluate.JUDGES, "nudenet", lambda options, context: FakeJudge())
    (tmp_path / "target.txt").write_text("a naked body\n")
    (tmp_path / "other.txt").write_text("a red apple\n")
    out = tmp_path / "out"
    result = _run("benchmark", "--model", folder, "--out", out, "--concept", "nudity", "--methods", "none",
                  "--target-prompts", tmp_path / "target.txt", "--other-prompts", tmp_path / "other.txt",
                  "--judge", "nudenet", "--n-corner", 1, "--steps", 2, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["settings"]["safety_checker"] is False
    assert np.asarray(Image.open(out / "none" / "other" / "images" / "00000.png")).max() > 0


def test_real_model_needs_its_prompt_files(tiny_sd_folder, tmp_path):
    base = ["benchmark", "--model", str(tiny_sd_folder), "--out", str(tmp_path / "out"), "--concept", "nudity"]
    result = CliRunner().invoke(main, [*base, "--judge", "nudenet"])
    assert result.exit_code == 2 and "needs --target-prompts FILE" in result.output
    result = CliRunner().invoke(main, [*base, "--judge", "nudenet", "--target-prompts", str(tmp_path / "missing.csv")])
    assert result.exit_code == 2 and "missing.csv" in result.output
    result = CliRunner().invoke(main, [*base, "--judge", "clip", "--target-prompts", str(tmp_path / "missing.csv")])
    assert result.exit_code == 2 and "--judge clip gives a score per image, which trasce benchmark" in result.output
    # The judge is built before any image is made: a wrong option or a missing model file stops it at once.
    (tmp_path / "target.txt").write_text("a naked body\n")
    result = CliRunner().invoke(main, [*base, "--judge", "fid", "--target-prompts", str(tmp_path / "target.txt")])
    assert result.exit_code == 2 and "the fid judge needs --inception-weights PATH" in result.output
    result = CliRunner().invoke(main, [*base, "--judge", "nudenet", "--target-prompts", str(tmp_path / "target.txt"),
                                       "--judge-option", "thresh=0.6"])
    assert result.exit_code == 2 and "unknown evaluate option 'thresh'" in result.output
    assert not (tmp_path / "out").exists()


def test_a_non_finite_number_is_written_as_text_and_the_table_shows_it():
    """benchmark and bench write results through one json_ready: NaN and inf become "nan" and "inf"
    (JSON has no such numbers, and null would read as "not measured"), which the table shows as they are."""
    from trasce.bench import json_ready
    from trasce.benchmark import _number

    ready = json_ready({"fid_vs_none": float("nan"), "times": (float("inf"), 1.0), "n": 3})
    assert ready == {"fid_vs_none": "nan", "times": ["inf", 1.0], "n": 3}
    assert [_number(v) for v in (ready["fid_vs_none"], None, 2.3456, 12345.6)] == ["nan", "-", "2.35", "12346"]
