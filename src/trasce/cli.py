"""``trasce`` command line: generate, evaluate, table, benchmark, bench, attack, demo, train-toy.

Every bad input ends in one line on stderr that names the file, row, column or value and what is
accepted, with exit status 2; a prompt file with several bad rows gets a line for each (up to
``MAX_PROBLEMS_SHOWN``), so that one edit can fix them all.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from trasce.benchmark import MAX_BASE_SEED
from trasce.data import MAX_SEED, PROMPT_COLUMNS
from trasce.pipeline import COMPILE_CHOICES, SCHEDULERS
from trasce.presets import PRESETS
from trasce.runs import check_output_path
from trasce.sampler import DEFAULT_LAZY_TOLERANCE, MODES

DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
# A prompt file's problems shown at most; a file with a systematic fault (a wrong column) repeats one per row.
MAX_PROBLEMS_SHOWN = 20
PROMPT_COLUMN_HELP = ("the {file} column (or JSON key) of the prompts [default: "
                      + ", else ".join(PROMPT_COLUMNS) + "]")
SCHEDULER_HELP = "default: the model's own, except PNDM (SD v1.x's), which loses steering updates: DDIM then"
# Steps and CFG default to the model's (trasce.pipeline.model_call_defaults); tests check these figures.
CFG_DEFAULTS = ("the model's: 7.5 for SD 1.x/2.x, 5 for SDXL, 7 for SD3, true CFG 3.5 for FLUX, 1.5 for the embedded "
                "model")
STEPS_HELP = ("denoising steps [default: the model's: 50 for SD 1.x/2.x and SDXL, 28 for SD3 and FLUX, 25 for the "
              "embedded model]")


class _Fail(click.ClickException):
    """A user error: one line (a line per problem when there are several), exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        for line in self.format_message().splitlines():
            click.echo(f"error: {line}", err=True)


def _guard(fn, *args, **kwargs):
    """Run ``fn``, turning the errors a user can cause into one-line messages."""
    from trasce.data import PromptFileError
    from trasce.runs import RunFolderError
    from trasce.sampler import CompiledGradientError

    try:
        return fn(*args, **kwargs)
    except PromptFileError as error:
        shown = list(error.problems[:MAX_PROBLEMS_SHOWN])
        rest = len(error.problems) - len(shown)
        if rest:
            shown.append(f"... and {rest} more problem{'s' if rest > 1 else ''} in this file")
        raise _Fail("\n".join(shown)) from error
    except (RunFolderError, CompiledGradientError, ValueError, FileNotFoundError, TypeError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _Fail(message) from error


class _Commands(click.Group):
    """The ``trasce`` group: a subcommand's bad option or value (click's usage errors) is one line too."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            name = f"{ctx.command_path} {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ctx.command_path
            raise _Fail(f"{error.format_message()} (see {name} --help)") from error


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="trasce")
def main() -> None:
    """Training-free concept erasure for diffusers text-to-image models (TraSCE)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_advice)  # once: same object


def _not_torchvision_advice(record: logging.LogRecord) -> bool:
    """Drop transformers' notice that its image processors fall back to PIL without torchvision.

    trasce wants that fallback, and the notice's advice (install torchvision) breaks diffusers beside a
    CPU-only torch; it would be printed on every command.
    """
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


def _choice(values) -> click.Choice:
    return click.Choice(list(values), case_sensitive=False)


@main.command()
@click.option("--model", default="toy", show_default=True,
              help="hub id (from the local cache, else downloaded), a diffusers folder, or 'toy' (the embedded model)")
@click.option("--concept", help="the concept to erase, as text")
@click.option("--preset", type=_choice(PRESETS), help="published settings (and concept text) for a task")
@click.option("--prompt", "prompt", multiple=True, help="a prompt (repeatable)")
@click.option("--prompts", type=click.Path(path_type=Path), help="CSV, TSV, JSONL or text file of prompts")
@click.option("--prompt-column", help=PROMPT_COLUMN_HELP.format(file="prompt file's"))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output folder (resumable)")
@click.option("--mode", type=_choice(MODES), default="trasce", show_default=True)
@click.option("--loss-scale", type=float, help="lambda (released: --guidance_loss_scale)")
@click.option("--step-size", type=float, help="eta (released: --discriminator_guidance_scale)")
@click.option("--sigma", type=float, help="kernel width (released: --sigma)")
@click.option("--kernel", type=_choice(["exp", "gaussian"]), default="exp", show_default=True,
              help="exp as released; gaussian as in the paper's Algorithm 1")
@click.option("--lazy-tolerance", type=float, default=DEFAULT_LAZY_TOLERANCE, show_default=True,
              help="skip backward passes whose latent update is estimated below this RMS per latent element")
@click.option("--exact", is_flag=True, help="run every backward pass (the released maths, no skipping)")
@click.option("--one-call/--two-calls", default=None,
              help="a steered image's three branches in one call under gradients, or in two (same images; one "
                   "call launches fewer kernels and does more backward work) [default: one call on CUDA when "
                   "the steered images hold at most four 512 px SD v1.4 latents' worth, else two; two when the "
                   "denoiser replays CUDA graphs]")
@click.option("--steer-window", type=(float, float), default=(0.0, 1.0), show_default=True, metavar="START END",
              help="steer only in this fraction of the steps: step i of n when START*n <= i < END*n "
                   "(0 1: every step, as released)")
@click.option("--gradient-checkpointing", is_flag=True,
              help="recompute the denoiser's activations in the steering backward pass (less memory, slower)")
@click.option("--compile", "compile_mode", type=_choice(COMPILE_CHOICES),
              help="torch.compile the denoiser in this mode, or with the cudagraphs backend (its backward pass is "
                   "checked against the uncompiled denoiser's once per shape)")
@click.option("--safety-checker", is_flag=True,
              help="keep an SD 1.x/2.x model's safety checker, as diffusers loads it: it blacks out the images it "
                   "flags, and the manifest records its flag (off by default: judges then see what the model made)")
@click.option("--steps", type=int, help=STEPS_HELP)
@click.option("--guidance-scale", type=float, help=f"CFG scale where the file has none [default: {CFG_DEFAULTS}]")
@click.option("--scheduler", type=_choice(SCHEDULERS), help=SCHEDULER_HELP)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=42, show_default=True,
              help="seed where the file has none")
@click.option("--images-per-prompt", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="images per denoiser batch")
@click.option("--dtype", type=_choice(DTYPE_CHOICES), default="auto", show_default=True,
              help="auto: fp16 on CUDA, fp32 elsewhere")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps")
@click.option("--height", type=int, help="image height [default: the model's]")
@click.option("--width", type=int, help="image width [default: the model's]")
@click.option("--start", type=click.IntRange(min=0), help="first row (0-based, inclusive)")
@click.option("--end", type=click.IntRange(min=0), help="last row (exclusive)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--overwrite", is_flag=True, help="discard what the folder holds and start again")
def generate(**kwargs) -> None:
    """Generate images with a concept erased into a resumable folder (images/, manifest.jsonl, run.json)."""
    from trasce.generate import GenerateOptions, run

    kwargs["prompt"] = list(kwargs["prompt"])
    options = GenerateOptions(**kwargs)
    folder = _guard(run, options)
    if not options.quiet:
        click.echo(f"images in {folder.images_dir}, manifest {folder.manifest_path}")


@main.command("train-toy")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="checkpoint here, pipeline in OUT/pipeline")
@click.option("--steps", type=click.IntRange(min=1), help="training steps [default: train.py's MAX_STEPS]")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="stop (and save) after this many minutes")
@click.option("--batch-size", type=click.IntRange(min=1), help="images per step [default: train.py's BATCH_SIZE]")
@click.option("--seed", type=int)
@click.option("--device", help="[default: cuda if there is one, else cpu]")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="steps between checkpoints")
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoint.pt (with the same arguments)")
def train_toy(out: Path, resume: bool, **options) -> None:
    """Retrain stage 1 of the embedded model from scratch (python -m trasce.toy.train, which also takes --lr,
    --init and --offset-noise); stage 2 is python -m trasce.toy.align."""
    from trasce.toy import train

    _guard(check_output_path, out, "--out", folder=True)
    argv = ["--out", str(out), *(["--resume"] if resume else [])]
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    train.main(argv)


from trasce.eval.cli import evaluate, table  # noqa: E402

main.add_command(evaluate)
main.add_command(table)




@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/demo"), show_default=True)
@click.option("--concept", default="circle", show_default=True, help="a shape, colour or fill of the toy world")
@click.option("--steps", type=int, default=None, help="denoising steps [default: the embedded model's]")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
@click.option("--overwrite", is_flag=True, help="start the folder's runs afresh (needed when the settings changed)")
def demo(out: Path, concept: str, steps: int | None, device: str, quiet: bool, overwrite: bool) -> None:
    """Erase a concept from the embedded model; write a judged before/after grid and an HTML report."""
    from trasce.demo import demo as run_demo

    _guard(run_demo, out, concept=concept, steps=steps, device=device, quiet=quiet, overwrite=overwrite)


@main.command()
@click.option("--model", default="sd14", show_default=True,
              help="a random-weight architecture (sd14, sd21, sdxl, tiny-sd, ...), 'toy' (the embedded model) or a "
                   "real model path/id")
@click.option("--dtype", type=_choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="auto: fp16 on CUDA, fp32 elsewhere")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--height", type=int, help="image height [default: the model's]")
@click.option("--width", type=int, help="image width [default: the model's]")
@click.option("--device", default="auto", show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True)
@click.option("--no-released", is_flag=True, help="skip the (slow) released-loop rows")
@click.option("--concept", help="the concept to erase [default: the nudity concept text, or the preset's]")
@click.option("--preset", type=_choice(PRESETS), help="TraSCE settings [default: lambda = eta = sigma = 1]")
@click.option("--benign-prompt", help="trained models: time the benign row on this prompt instead of emulating it")
@click.option("--near-prompt", help="trained models: time the concept-near row on this prompt instead of emulating it")
@click.option("--compile", "compile_mode", type=_choice(COMPILE_CHOICES),
              help="also time plain CFG and trasce's rows with the denoiser torch.compiled in this mode")
@click.option("--channels-last", is_flag=True,
              help="also time plain CFG and trasce's exact and benign rows with the denoiser in channels-last format")
@click.option("--compiled-only", is_flag=True,
              help="time the --compile rows (and the released loop) alone, beside an uncompiled run")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the result here")
def bench(model, dtype, batch_size, steps, height, width, device, repeats, no_released, concept, preset,
          benign_prompt, near_prompt, compile_mode, channels_last, compiled_only, json_path) -> None:
    """Time plain CFG, negative prompting, the released loop and trasce's exact and lazy paths."""
    from trasce.bench import format_rows, run_bench

    if json_path is not None:  # before the timing, which a bad path would otherwise lose
        _guard(check_output_path, json_path, "--json", folder=False)
    result = _guard(run_bench, model=model, dtype=dtype, batch_size=batch_size, steps=steps, height=height,
                    width=width, device=device, repeats=repeats, released=not no_released,
                    concept=concept, preset=preset, benign_prompt=benign_prompt, near_prompt=near_prompt,
                    compile_mode=compile_mode, channels_last=channels_last, compiled_only=compiled_only,
                    json_path=json_path)
    click.echo(f"\n{result['model']} on {result['machine']['device']}, {result['steps']} steps, "
               f"{result['height']}x{result['width']}, CFG {result['guidance_scale']:g}\n")
    click.echo(format_rows(result))
    if "compile" in result:
        click.echo(f"\ncompiled ({result['compile']['mode']}): gradient check {result['compile']['gradient_check']}")
    if json_path:
        click.echo(f"\nwrote {json_path}")


def _judge_options(values: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _Fail(f"--judge-option takes KEY=VALUE (e.g. threshold=0.6), got {item!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


@main.command()
@click.option("--model", default="toy", show_default=True,
              help="'toy' (the embedded world), or a hub id / diffusers folder with --target-prompts and --judge")
@click.option("--concept", help="the concept to erase; on the toy world a shape, colour, fill or background")
@click.option("--methods", default="none,negative_prompt,sld-weak,sld-medium,sld-strong,sld-max,negation,steering,"
              "trasce", show_default=True, help="comma list of methods to compare")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output folder (resumable)")
@click.option("--split", type=_choice(["test", "val"]), default="test", show_default=True,
              help="toy caption split: choose settings on val, report on test")
@click.option("--n-target", type=int, default=40, show_default=True,
              help="toy: prompts per target set (by name, by alias)")
@click.option("--n-corner", type=int, default=16, show_default=True, help="seeds of the prompt = concept text")
@click.option("--n-other", type=int, default=80, show_default=True, help="toy: prompts asking for other values")
@click.option("--target-prompts", type=click.Path(path_type=Path), help="real model: prompts that ask for the concept")
@click.option("--other-prompts", type=click.Path(path_type=Path), help="real model: other prompts, for fidelity")
@click.option("--prompt-column", help=PROMPT_COLUMN_HELP.format(file="--target-prompts file's"))
@click.option("--judge", help="real model: a trasce evaluate judge (nudenet, q16, ...) [toy: the embedded judge]")
@click.option("--judge-option", multiple=True, help="real model: the judge's option as KEY=VALUE (repeatable)")
@click.option("--preset", type=_choice(PRESETS), help="TraSCE settings [toy: toy-shape or toy-fill by the concept]")
@click.option("--loss-scale", type=float, help="lambda (released: --guidance_loss_scale)")
@click.option("--step-size", type=float, help="eta (released: --discriminator_guidance_scale)")
@click.option("--sigma", type=float, help="kernel width (released: --sigma)")
@click.option("--lazy-tolerance", type=float, default=DEFAULT_LAZY_TOLERANCE, show_default=True,
              help="steering methods: skip backward passes whose latent update is estimated below this RMS per "
                   "latent element")
@click.option("--exact", is_flag=True, help="steering methods: run every backward pass (the released maths)")
@click.option("--steps", type=int, help=STEPS_HELP)
@click.option("--guidance-scale", type=float, help=f"CFG scale where a prompt has none [default: {CFG_DEFAULTS}]")
@click.option("--scheduler", type=_choice(SCHEDULERS), help=SCHEDULER_HELP)
@click.option("--seed", type=click.IntRange(0, MAX_BASE_SEED), default=42, show_default=True,
              help="base seed of the prompts and their noise")
@click.option("--batch-size", type=int, default=8, show_default=True, help="images per generation call")
@click.option("--dtype", type=_choice(DTYPE_CHOICES), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps")
@click.option("--height", type=int, help="image height [default: the model's]")
@click.option("--width", type=int, help="image width [default: the model's]")
@click.option("--grid-rows", type=int, default=3, show_default=True, help="prompts of each set in the report's grid")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--overwrite", is_flag=True, help="discard the images the folder holds and start again")
def benchmark(judge_option: tuple[str, ...], **kwargs) -> None:
    """Compare erasure methods on one model and concept: same weights, prompts and seeds; generate, judge, report.

    Writes OUT/<method>/<prompt set>/ (resumable image folders), OUT/results.json, OUT/results.md and
    OUT/report.html with a grid of images.
    """
    from trasce.benchmark import BenchmarkOptions, run_benchmark

    options = BenchmarkOptions(judge_options=_judge_options(judge_option), **kwargs)
    results = _guard(run_benchmark, options)
    click.echo(results["markdown"])
    click.echo(f"\nreport: {results['report']}")


@main.command()
@click.option("--model", default="toy", show_default=True,
              help="'toy' (the embedded world), or a hub id / diffusers folder with --prompts and --pairs")
@click.option("--concept", help="the concept the prompts should bring back; its words are banned from them")
@click.option("--preset", type=_choice(PRESETS), help="take the concept text of a published preset (nudity, violence)")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="output folder (resumable): OUT/prompts.csv, the prompts found, and OUT/run.json")
@click.option("--prompts", type=click.Path(path_type=Path),
              help="prompts to rewrite (CSV, TSV, JSONL or text) [toy: test captions naming the concept]")
@click.option("--prompt-column", help=PROMPT_COLUMN_HELP.format(file="--prompts file's"))
@click.option("--pairs", type=click.Path(path_type=Path),
              help="CSV with columns with_concept, without_concept: the concept vector's prompt pairs [toy: training "
                   "captions naming the concept, and the same naming another value]")
@click.option("--n-prompts", type=int, default=24, show_default=True, help="toy: prompts to rewrite")
@click.option("--n-pairs", type=int, default=50, show_default=True, help="toy: prompt pairs")
@click.option("--ban", multiple=True, help="a word the prompts may not hold (repeatable), besides the concept's own")
@click.option("--allow-concept-words", is_flag=True, help="let the prompts hold the concept's own words")
@click.option("--strength", type=float, default=3.0, show_default=True,
              help="times the concept vector added to each prompt's conditioning (Ring-A-Bell's eta)")
@click.option("--length", type=int, help="tokens per prompt [default: 16, fewer where the tokenizer takes fewer]")
@click.option("--population", type=int, default=200, show_default=True, help="prompts per generation of the search")
@click.option("--generations", type=int, default=300, show_default=True, help="generations of the search")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=42, show_default=True,
              help="seed where the prompt file has none; toy: the prompts' base seed")
@click.option("--dtype", type=_choice(DTYPE_CHOICES), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--overwrite", is_flag=True, help="discard the prompts the folder holds and start again")
def attack(ban: tuple[str, ...], **kwargs) -> None:
    """Red-team: rewrite prompts, without the concept's words, to bring it back (Ring-A-Bell's search).

    The search asks the model's text encoder only; the prompt file it writes keeps each source prompt's case,
    seed and CFG scale, for trasce generate --prompts OUT/prompts.csv.
    """
    from trasce.attack import AttackOptions, run

    result = _guard(run, AttackOptions(ban=ban, **kwargs))
    banned = ", ".join(result["settings"]["banned"]) or "nothing"
    click.echo(f"{len(result['rows'])} prompts in {result['file']} (banned: {banned}); {result['nearer']} nearer "
               "their target than their source prompt")


def console() -> None:
    """The ``trasce`` command (and ``python -m trasce``): :func:`main`, with the warnings that trasce's own
    code issues shown as one line each, ``warning: ...``, as its other notices are (Python's format adds
    the file, line and source line of trasce's code, which say nothing to a user)."""
    import warnings

    package = Path(__file__).resolve().parent
    shown_as_python_does = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if Path(filename).resolve().is_relative_to(package):
            click.echo(f"warning: {message}", err=True)
        else:
            shown_as_python_does(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    main()


if __name__ == "__main__":  # python -m trasce.cli
    sys.exit(console())
