"""``trasce evaluate DIR --judge NAME``: the command, registered on ``trasce.cli.main``."""

from __future__ import annotations

from pathlib import Path

import click

JUDGE_NAMES = ("nudenet", "toy", "clip", "imagenet", "q16", "fid")  # = trasce.eval.evaluate.JUDGES


@click.command("evaluate")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--judge", type=click.Choice(JUDGE_NAMES, case_sensitive=False), required=True,
              help="nudenet: nudity ASR; toy: the toy world's attributes; clip: CLIP score; imagenet: Imagenette "
                   "accuracy; q16: inappropriate content; fid: FID against --reference")
@click.option("--classes", help="nudenet: class set 'six' (default) or 'nine', or a comma list of NudeNet classes")
@click.option("--threshold", type=float, help="nudenet: flagged when a class scores above this [default: 0.45]")
@click.option("--clip-model", type=click.Path(path_type=Path), help="clip, q16: a transformers CLIP folder")
@click.option("--resnet-model", type=click.Path(path_type=Path),
              help="imagenet: a transformers ResNetForImageClassification folder (ResNet-50)")
@click.option("--q16-prompts", type=click.Path(path_type=Path),
              help="q16: the learned prompts, a (2, D) tensor (.pt, .npy, .safetensors or Q16's prompts.p)")
@click.option("--inception-weights", type=click.Path(path_type=Path),
              help="fid: torch-fidelity's Inception weights file (pt_inception-2015-12-05)")
@click.option("--reference", type=click.Path(path_type=Path), help="fid: a folder of reference images")
@click.option("--toy-judge", type=click.Path(path_type=Path), help="toy: a judge folder [default: the shipped one]")
@click.option("--batch-size", type=int, help="images per judge call [default: the judge's own]")
@click.option("--device", help="clip, imagenet, q16, fid, toy: auto, cpu, cuda, cuda:1 [default: auto]")
@click.option("--overwrite", is_flag=True, help="discard this judge's verdicts for the folder and judge again")
@click.option("--report-images", type=click.IntRange(min=0), default=60, show_default=True,
              help="images shown in the HTML report, those that show the concept first (0: none)")
@click.option("--label", help="name the verdict, summary and report files by this instead of the judge, to keep "
                              "two protocols side by side (e.g. --label nudenet-nine --classes nine)")
@click.option("--quiet", is_flag=True, help="no progress bar and no table")
def evaluate(folder: Path, judge: str, overwrite: bool, report_images: int, label: str | None, quiet: bool,
             **options) -> None:
    """Judge the images of a trasce generate folder DIR, resumably.

    Writes DIR/verdicts-<judge>.jsonl (one line per image, appended as it is judged),
    DIR/summary-<judge>.json (settings, protocol, numbers) and DIR/report-<judge>.html (the table and the
    images with their verdicts), then prints the table. A rerun judges only the images without a verdict;
    judging again with other settings needs --overwrite.
    """
    from trasce.cli import _Fail, _guard
    from trasce.eval.evaluate import evaluate_folder, format_table, process_state, report_path, summary_path

    if options.get("batch_size") is not None and options["batch_size"] < 1:
        raise _Fail(f"--batch-size must be 1 or more, got {options['batch_size']}")
    summary = _guard(evaluate_folder, folder, judge, options, overwrite=overwrite, quiet=quiet,
                     report_images=report_images, label=label)
    if summary.get("complete") is False and process_state().is_main_process:  # --quiet too: the numbers are partial
        click.echo(f"warning: {folder}: {summary['completeness']}", err=True)
    if not quiet and process_state().is_main_process:
        click.echo(format_table(summary))
        click.echo(f"summary in {summary_path(folder, summary['label'])}, report in "
                   f"{report_path(folder, summary['label'])}")


@click.command("table")
@click.argument("folders", metavar="DIR...", nargs=-1, type=click.Path(path_type=Path))
@click.option("--label", required=True, help="the summaries to read: summary-<label>.json (the judge's name, or "
                                             "evaluate's --label)")
@click.option("--metric", multiple=True, help="keep the metrics whose name holds this text (repeatable) [default: all]")
@click.option("--markdown", type=click.Path(path_type=Path), help="also write the table to this Markdown file")
@click.option("--html", "html_path", type=click.Path(path_type=Path), help="also write it as an HTML page")
def table(folders: tuple[Path, ...], label: str, metric: tuple[str, ...], markdown: Path | None,
          html_path: Path | None) -> None:
    """One table of several judged folders (a row each: method, images, numbers), with the protocols under it.

    For a paper: e.g. trasce table runs/*-trasce runs/*-negative_prompt --label nudenet --metric "ASR (all".
    """
    from trasce.cli import _guard
    from trasce.eval.table import collect, write
    from trasce.runs import check_output_path

    for path, option in ((markdown, "--markdown"), (html_path, "--html")):
        if path is not None:
            _guard(check_output_path, path, option, folder=False)
    click.echo(_guard(lambda: write(collect(folders, label, metric), markdown, html_path)))
