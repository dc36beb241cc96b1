"""``trasce bench`` on a tiny random SD architecture: every row runs the work its name says."""

import json

import pytest
import torch
from click.testing import CliRunner

from trasce.bench import weights_gib
from trasce.cli import main
from trasce.pipeline import toy_defaults

STEPS = 3


def test_bench_rows_ratios_and_backward_passes(tmp_path):
    out = tmp_path / "bench.json"
    # without --dtype: auto, which is fp32 on a CPU (half precision there is many times slower)
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-sd", "--batch-size", "2",
                                       "--steps", str(STEPS), "--device", "cpu", "--repeats", "1",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert {r["dtype"] for r in written["rows"]} == {"fp32"}
    assert written["rounds_done"] == written["repeats"] == 1
    rows = written["rows"]
    by_name = {(r["method"], r["prompts"], r["batch_size"]): r for r in rows}
    backward = {key: r["backward_passes"] for key, r in by_name.items()}
    assert backward == {
        ("plain CFG (diffusers)", "any", 2): None, ("negative prompt", "any", 2): None,
        ("trasce negation", "any", 2): None,
        ("trasce exact, two calls", "any", 2): STEPS,  # exact: a backward pass at every step, whatever the prompt
        ("trasce exact, one call", "any", 2): STEPS,
        ("trasce exact, two calls, checkpointed", "any", 2): STEPS,
        ("trasce lazy", "benign", 2): 1,  # the first step measures ||dd/dx||, then the kernel is "off"
        ("trasce lazy", "concept-near", 2): STEPS,
        ("released loop", "any", 1): STEPS, ("plain CFG (diffusers)", "any", 1): None,
    }
    settings = by_name[("trasce exact, two calls", "any", 2)]["settings"]
    assert settings["lazy_tolerance"] is None
    # the lazy rows record the number of calls trasce chose for this device (two, on a CPU)
    assert [by_name[key]["settings"]["one_call"] for key in (("trasce lazy", "benign", 2),
            ("trasce lazy", "concept-near", 2), ("trasce exact, one call", "any", 2))] == [False, False, True]
    for r in rows:
        plain = by_name[("plain CFG (diffusers)", "any", r["batch_size"])]["seconds_per_image"]
        assert abs(r["ratio_to_plain"] - r["seconds_per_image"] / plain) < 1e-3
    assert "| trasce exact, two calls | any | fp32 | 2 |" in result.output


def test_on_flux_the_diffusers_rows_run_true_cfg_at_the_rows_scale(monkeypatch):
    # FluxPipeline's own guidance_scale is the distilled guidance: its CFG is true_cfg_scale with a negative prompt.
    from diffusers import FluxPipeline

    seen = []
    call = FluxPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append({key: kwargs.get(key) for key in ("true_cfg_scale", "negative_prompt", "guidance_scale")})
        return call(self, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", spy)
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-flux", "--batch-size", "1", "--steps", "1",
                                       "--device", "cpu", "--repeats", "1", "--no-released", "--concept", "a cat"])
    assert result.exit_code == 0, result.output
    assert {(s["true_cfg_scale"], tuple(s["negative_prompt"]), s["guidance_scale"]) for s in seen} == {
        (3.5, ("",), 3.5), (3.5, ("a cat",), 3.5)}


def test_bench_refuses_a_size_the_family_cannot_make():
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-flux", "--steps", "1", "--repeats", "1",
                                       "--no-released", "--device", "cpu", "--height", "72", "--width", "72"])
    assert result.exit_code == 2
    assert "height and width must be multiples of 16 for FLUX.1; got 72x72" in result.output


def test_weights_gib_counts_parameters_and_buffers_of_every_module():
    class Pipe:
        components = {"unet": torch.nn.Linear(10, 10).half(), "norm": torch.nn.BatchNorm1d(4), "tokenizer": "x"}

    # fp16 linear: 110 parameters x 2 bytes; batch norm: 8 parameters and 8 running statistics x 4 bytes, plus
    # its 8-byte batch counter
    assert weights_gib(Pipe()) * 2**30 == 110 * 2 + 8 * 4 + 8 * 4 + 8


def test_bench_times_real_prompts_on_a_trained_model(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--model", "toy", "--dtype", "fp32", "--batch-size", "1",
                                       "--steps", "6", "--device", "cpu", "--repeats", "1", "--no-released",
                                       "--preset", "toy-shape", "--concept", "circle",
                                       "--benign-prompt", "a red square", "--near-prompt", "a circle",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["guidance_scale"] == toy_defaults("toy")["guidance_scale"]  # every row at the model's CFG
    rows = {r["prompts"]: r for r in written["rows"] if r["method"] == "trasce lazy"}
    assert rows["benign"]["note"] == "prompt 'a red square'" and rows["concept-near"]["note"] == "prompt 'a circle'"
    assert rows["benign"]["settings"]["sigma"] == 0.1  # the preset's
    # the real lazy decision: the circle keeps steering, the square skips after measuring ||dd/dx||
    assert rows["benign"]["backward_passes"] <= 2 < rows["concept-near"]["backward_passes"]


def test_bench_refuses_real_prompts_with_random_weights():
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-sd", "--near-prompt", "a nude"])
    assert result.exit_code == 2
    assert "--benign-prompt and --near-prompt need a trained model; 'tiny-sd' has random weights" in result.output


@pytest.mark.parametrize("extra", [[], ["--no-released"], ["--compile", "default", "--channels-last"]])
def test_bench_compiled_only_needs_compile_and_no_uncompiled_rows(extra):
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-sd", "--compiled-only", *extra])
    assert result.exit_code == 2
    assert result.output == ("error: --compiled-only times the compiled rows (and the released loop) alone: it needs "
                             "--compile, and takes neither --channels-last nor real prompts (uncompiled rows)\n")


def test_bench_writes_its_rounds_as_they_end_and_keeps_them_when_stopped(tmp_path, monkeypatch):
    import trasce.bench
    from trasce.bench import run_bench

    out, timed = tmp_path / "bench.json", []
    seconds = trasce.bench._seconds

    def stopping(fn, device):
        if len(timed) == 8:  # the 8 rows' first round is done: stop the run in its second round
            raise KeyboardInterrupt  # what a lease's end (SIGINT, or a kill) does to the run
        timed.append(seconds(fn, device))
        return timed[-1]

    monkeypatch.setattr(trasce.bench, "_seconds", stopping)
    with pytest.raises(KeyboardInterrupt):
        run_bench(model="tiny-sd", dtype="fp32", batch_size=2, steps=STEPS, device="cpu", repeats=3,
                  released=False, quiet=True, json_path=out)
    kept = json.loads(out.read_text())
    assert kept["rounds_done"] == 1 and kept["repeats"] == 3
    assert [r["seconds_per_image"] for r in kept["rows"]] == pytest.approx([t / 2 for t in timed])
    assert kept["rows"][0]["method"] == "plain CFG (diffusers)" and kept["rows"][0]["ratio_to_plain"] == 1.0


def test_a_failing_row_is_reported_and_the_others_are_timed(tmp_path, monkeypatch):
    import trasce.bench
    from trasce.bench import run_bench

    out = tmp_path / "bench.json"
    out.write_text('{"an earlier run": true}')
    warm_up, seconds, calls = trasce.bench._warm_up, trasce.bench._seconds, {"warm": 0, "timed": 0}

    def failing_warm_up(fn, device):  # the third row runs out of memory in its warm-up
        calls["warm"] += 1
        if calls["warm"] == 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return warm_up(fn, device)

    def failing_seconds(fn, device):  # the first row (plain CFG) fails in the second round
        calls["timed"] += 1
        if calls["timed"] == 8:
            raise RuntimeError("device lost")
        return seconds(fn, device)

    monkeypatch.setattr(trasce.bench, "_warm_up", failing_warm_up)
    monkeypatch.setattr(trasce.bench, "_seconds", failing_seconds)
    result = run_bench(model="tiny-sd", dtype="fp32", batch_size=2, steps=STEPS, device="cpu", repeats=2,
                       released=False, quiet=True, json_path=out)
    rows = result["rows"]
    assert [r["error"] for r in rows[:3]] == [
        "RuntimeError: device lost", None, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert rows[0]["seconds_per_image"] is None and rows[2]["seconds_per_image"] is None
    assert all(r["seconds_per_image"] > 0 and r["error"] is None for r in rows[3:])
    assert all(r["ratio_to_plain"] is None for r in rows)  # no plain CFG row to divide by
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str).replace("Infinity", '"inf"'))
    assert '"lazy_tolerance": "inf"' in out.read_text()  # the benign row's forced tolerance, in valid JSON
    table = trasce.bench.format_rows(result)
    assert "| trasce negation | any | fp32 | 2 | failed |" in table
    assert table.endswith("trasce negation (any) failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")


def test_at_fp32_batch_1_the_released_loop_shares_the_plain_cfg_row():
    from trasce.bench import run_bench

    result = run_bench(model="tiny-sd", dtype="fp32", batch_size=1, steps=STEPS, device="cpu", repeats=1, quiet=True)
    plain = [r for r in result["rows"] if r["method"] == "plain CFG (diffusers)"]
    assert len(plain) == 1 and plain[0]["ratio_to_plain"] == 1.0
    released = next(r for r in result["rows"] if r["method"] == "released loop")
    assert released["ratio_to_plain"] == pytest.approx(released["seconds_per_image"] / plain[0]["seconds_per_image"],
                                                       abs=1e-3)


def test_bench_needs_a_timed_round():
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-sd", "--repeats", "0"])
    assert result.exit_code == 2
    assert result.output == "error: --repeats must be at least 1 (timed rounds after the warm-up), got 0\n"


@pytest.mark.parametrize(("args", "said"), [
    (("--steps", "0"), "error: --steps must be at least 1, got 0"),
    (("--batch-size", "0"), "error: --batch-size must be at least 1, got 0"),
    (("--height", "60"), "error: --height must be a positive multiple of 8, got 60"),
    (("--steps", "1001"), "error: --steps 1001: `num_inference_steps`: 1001 cannot be larger than"),
])
def test_bench_refuses_what_every_row_would_fail_on_before_timing(args, said):
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-sd", "--repeats", "1", "--device", "cpu", *args])
    assert result.exit_code == 2
    assert result.output.startswith(said), result.output
    assert result.output.count("\n") == 1


def test_bench_refuses_a_device_this_machine_lacks():
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-sd", "--device", "bogus"])
    assert result.exit_code == 2
    assert result.output == "error: unknown device 'bogus'; expected auto, cpu, cuda, cuda:N or mps\n"


def test_bench_channels_last_rows(monkeypatch):
    import trasce.bench

    formats = []  # per denoiser call: were its weights in channels-last format?
    loaded = []
    load = trasce.bench.load_for_bench

    def load_and_watch(*args):
        loaded.append(load(*args))
        loaded[-1].unet.register_forward_pre_hook(lambda module, _: formats.append(
            module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)))
        return loaded[-1]

    monkeypatch.setattr(trasce.bench, "load_for_bench", load_and_watch)
    result = trasce.bench.run_bench(model="tiny-sd", dtype="fp32", batch_size=2, steps=STEPS, device="cpu",
                                    repeats=1, released=False, quiet=True, channels_last=True)
    rows = {(r["method"], r["prompts"]): r for r in result["rows"] if r["memory_format"] == "channels_last"}
    assert {key: r["backward_passes"] for key, r in rows.items()} == {
        ("plain CFG (diffusers)", "any"): None, ("trasce exact, two calls", "any"): STEPS, ("trasce lazy", "benign"): 1}
    plain = rows[("plain CFG (diffusers)", "any")]["seconds_per_image"]
    exact = rows[("trasce exact, two calls", "any")]
    assert abs(exact["ratio_to_plain"] - exact["seconds_per_image"] / plain) < 1e-3  # against channels-last plain
    assert "| trasce exact, two calls, channels-last | any | fp32 | 2 |" in trasce.bench.format_rows(result)
    # the channels-last rows ran in that format, the other rows did not, and the format is restored
    assert True in formats and False in formats
    assert not loaded[0].unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_bench_compiled_rows_and_their_gradient_check(monkeypatch):
    import trasce.bench
    from trasce import sampler
    from trasce.bench import run_bench

    # aot_eager traces and differentiates the denoiser as inductor does, in seconds and without its CPU bugs.
    compile_ = torch.compile
    monkeypatch.setattr(trasce.bench.torch, "compile", lambda module, **_: compile_(module, backend="aot_eager"))
    monkeypatch.setattr(trasce.bench, "_warm_up", lambda fn, device: (fn(), 0.5))  # as if on CUDA: 0.5 GiB working
    torch._dynamo.reset()
    kwargs = dict(model="tiny-sd", dtype="fp32", batch_size=2, steps=STEPS, device="cpu", repeats=1,
                  released=False, quiet=True, compile_mode="default")
    result = run_bench(**kwargs)
    assert all(r["peak_memory_gib"] > 0.5 for r in result["rows"])  # inductor without CUDA graphs: measured
    assert result["compile"] == {"mode": "default", "gradient_check": "passed"}
    compiled = {(r["method"], r["prompts"]): r for r in result["rows"] if r["compile_mode"] == "default"}
    assert {key: r["backward_passes"] for key, r in compiled.items()} == {
        ("plain CFG (diffusers)", "any"): None, ("trasce negation", "any"): None,
        ("trasce exact, two calls", "any"): STEPS, ("trasce exact, one call", "any"): STEPS,
        ("trasce lazy", "benign"): 1}
    plain = compiled[("plain CFG (diffusers)", "any")]["seconds_per_image"]
    exact = compiled[("trasce exact, two calls", "any")]
    assert abs(exact["ratio_to_plain"] - exact["seconds_per_image"] / plain) < 1e-3  # against compiled plain CFG
    assert "| trasce exact, two calls, compiled (default) | any | fp32 | 2 |" in trasce.bench.format_rows(result)
    alone = run_bench(**{**kwargs, "compile_mode": "cudagraphs"}, compiled_only=True)
    assert [(r["method"], r["compile_mode"], r["peak_memory_gib"]) for r in alone["rows"]] == [
        (method, "cudagraphs", None)
        for method in ("plain CFG (diffusers)", "trasce negation", "trasce exact, two calls", "trasce exact, one call",
                       "trasce lazy")]
    assert alone["compile"]["gradient_check"] == "passed"

    monkeypatch.setattr(sampler.GradientCheck, "tolerance", -1.0)  # no gradient passes: the check fails
    torch._dynamo.reset()
    result = run_bench(**kwargs)
    assert result["compile"]["gradient_check"].startswith("failed: the compiled denoiser's backward pass differs")
    assert [r["method"] for r in result["rows"] if r["compile_mode"]] == ["plain CFG (diffusers)", "trasce negation"]

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(trasce.bench.torch, "compile", lambda module, **_: compile_(module, backend=no_compiler))
    torch._dynamo.reset()
    result = run_bench(**kwargs)
    assert result["compile"]["gradient_check"].startswith("did not run: ")
    assert "no C++ compiler" in result["compile"]["gradient_check"]
    assert not [r for r in result["rows"] if r["compile_mode"]]  # the other rows are all there
    assert {r["method"] for r in result["rows"]} >= {"plain CFG (diffusers)", "trasce exact, two calls", "trasce lazy"}
    torch._dynamo.reset()
