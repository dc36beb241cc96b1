"""Judge every image of a ``trasce generate`` folder, resumably: ``trasce evaluate DIR --judge NAME``.

Files written next to the images, one pair per judge, so several judges can score one folder
(NudeNet and Q16 on I2P, CLIP score and FID on COCO)::

    DIR/verdicts-<judge>.jsonl   a header line {"header": true, "judge", "settings", ...}, then one line per
                                 image: file, case, k, prompt, image_sha256 (of the PNG bytes judged) and
                                 the judge's raw outputs and decision
    DIR/summary-<judge>.json     the judge's settings, its protocol line and the numbers to report,
                                 whether the folder holds every image trasce generate was asked for,
                                 and how many images a safety checker blacked out when they were made
    DIR/report-<judge>.html      the same as a page, with the images and their verdicts

Each verdict line is appended (one ``write`` under an exclusive ``flock``, fsynced) as soon as its image
is judged, so an interrupted evaluation loses at most the batch in flight. A rerun judges only the
images of the manifest that have no verdict yet, or whose verdict was about other bytes than the file
now holds (an image deleted and made again from an edited row keeps its name), provided the judge's
settings are the ones in the header; otherwise it stops and asks for ``--overwrite`` (never mixing
verdicts of two protocols).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trasce.eval.base import Context, Judge, file_sha256, run_concept
from trasce.runs import (
    MANIFEST_NAME,
    REPORT_NAME,
    REQUESTED_NAME,
    SUMMARY_NAME,
    VERDICTS_NAME,
    RunFolder,
    append_lines,
    atomic_write_bytes,
    failing_together,
    package_versions,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - off Unix
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "JUDGES",
    "JUDGE_OPTIONS",
    "evaluate_folder",
    "format_table",
    "read_verdicts",
    "summary_path",
    "verdicts_path",
]

Factory = Callable[[Mapping[str, Any], Context], Judge]


def _lazy(module: str) -> Factory:
    """A factory that imports ``trasce.eval.<module>`` only when the judge is built."""

    def build(options: Mapping[str, Any], context: Context) -> Judge:
        return importlib.import_module(f"trasce.eval.{module}").build(options, context)

    build.__qualname__ = build.__name__ = f"build_{module}"
    return build


# name -> factory(options, context) -> Judge
JUDGES: dict[str, Factory] = {
    "nudenet": _lazy("nudenet"),
    "toy": _lazy("toy"),
    "clip": _lazy("clip_score"),
    "imagenet": _lazy("imagenet"),
    "q16": _lazy("q16"),
    "fid": _lazy("fid"),
}
# The options each judge reads; any other judge-specific option given is an error, not silently ignored.
# (NudeNet's detector takes no device: onnxruntime chooses where it runs.)
JUDGE_OPTIONS: dict[str, tuple[str, ...]] = {
    "nudenet": ("classes", "threshold"),
    "toy": ("toy_judge", "device"),
    "clip": ("clip_model", "device"),
    "imagenet": ("resnet_model", "device"),
    "q16": ("clip_model", "q16_prompts", "device"),
    "fid": ("inception_weights", "reference", "device"),
}
COMMON_OPTIONS: tuple[str, ...] = ("batch_size",)
VERDICT_FIELDS: tuple[str, ...] = ("file", "case", "k", "prompt")
# The verdict's record of which image it judged: an image made again under the same name (its row was
# edited, or it was replaced by hand) has other bytes, and is judged again.
IMAGE_HASH = "image_sha256"


def verdicts_path(folder: str | Path, judge: str) -> Path:
    return Path(folder) / VERDICTS_NAME.format(judge=judge)


def summary_path(folder: str | Path, judge: str) -> Path:
    return Path(folder) / SUMMARY_NAME.format(judge=judge)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


# --------------------------------------------------------------------------------------------------
# verdicts-<judge>.jsonl


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _normalise(value: Any) -> Any:
    """``value`` as it reads back from JSON."""
    return json.loads(_dumps(value))


def _append_lines(path: Path, records: Sequence[Mapping[str, Any]], header: Mapping[str, Any] | None = None) -> None:
    """Append JSON lines (``header`` first if the file is empty), as the run folders' manifest does."""
    append_lines(path, [_dumps(dict(record)) + "\n" for record in records],
                 header=None if header is None else _dumps(dict(header)) + "\n")


def read_verdicts(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """``(header, {file: verdict})`` of a verdicts file; ``(None, {})`` when there is none.

    Unreadable lines (a crash mid-append leaves a truncated last line) are skipped; when a file appears
    twice the last verdict wins. A second header whose judge or settings differ from the first (two
    files' lines joined) is a ``ValueError``: its verdicts were made under another protocol.
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below; the lock lives while it is open
    except FileNotFoundError:
        return None, {}
    with handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        data = handle.read()
    header: dict[str, Any] | None = None
    header_line = 0
    verdicts: dict[str, dict[str, Any]] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(record, dict):
            continue
        if record.get("header") is True and header is None:
            header, header_line = record, number
        elif record.get("header") is True:
            first, later = ({"judge": h.get("judge"), **(h.get("settings") or {})} for h in (header, record))
            key = _first_difference(first, later, ())
            if key is not None:
                was, now = (_show(values.get(key, "<not set>")) for values in (first, later))
                raise ValueError(
                    f"{path} holds verdicts made under two protocols: {key!r} is {was} in the header on line "
                    f"{header_line} and {now} in the one on line {number} (two files joined?); keep one protocol's "
                    "lines, or delete the file to judge every image again"
                )
        elif isinstance(record.get("file"), str):
            verdicts.pop(record["file"], None)
            verdicts[record["file"]] = record
    return header, verdicts


def _first_difference(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str]) -> str | None:
    for key in sorted((set(old) | set(new)) - set(ignore)):
        if old.get(key, "<not set>") != new.get(key, "<not set>"):
            return key
    return None


def _show(value: Any, limit: int = 80) -> str:
    text = _dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Reading the folder


def load_image(path: Path) -> tuple[Any, str]:
    """The image at ``path`` and the SHA-256 of the bytes it was decoded from (read once, so they agree)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return (image.copy() if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB"),
                    hashlib.sha256(data).hexdigest())
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        # (PIL names the buffer it read, "<_io.BytesIO object at 0x...>", where it knows no format)
        reason = "not in an image format PIL reads" if isinstance(error, UnidentifiedImageError) else str(error)
        raise ValueError(
            f"cannot read image {path} ({reason}); delete it and rerun the command that made it (trasce generate "
            "or trasce benchmark) to make it again"
        ) from error


def _judged_elsewhere(folder: Path, record: Mapping[str, Any], verdict: Mapping[str, Any] | None) -> bool:
    """Whether ``verdict`` (``None``: there is none) fails to be about the image ``record`` names as it is now.

    A verdict without an image hash (written before trasce recorded one) counts as about another image:
    its image may have been made again since, and judging it once more costs one pass, while keeping a
    verdict of another image would report a rate of images that are not in the folder.
    """
    if verdict is None:
        return True
    return verdict.get(IMAGE_HASH) != file_sha256(folder / record["file"])


def _check_options(judge_name: str, options: Mapping[str, Any]) -> None:
    known = {key for keys in JUDGE_OPTIONS.values() for key in keys} | set(COMMON_OPTIONS)
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"unknown evaluate option {key!r}; known: {', '.join(sorted(known))}")
        given = value is not None and value is not False and value != ""  # (0 and 0.0 are given values)
        if given and key not in JUDGE_OPTIONS[judge_name] and key not in COMMON_OPTIONS:
            users = [name for name, keys in JUDGE_OPTIONS.items() if key in keys]
            raise ValueError(f"{_flag(key)} is for --judge {' or '.join(users)}, not --judge {judge_name}")


def _judge_and_options(judge_name: str, options: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The judge's name as ``JUDGES`` holds it, and its options without the ``None`` ones, checked."""
    name = (judge_name or "").strip().lower()
    if name not in JUDGES:
        raise ValueError(f"unknown judge {judge_name!r}; valid judges: {', '.join(JUDGES)}")
    options = {key: value for key, value in dict(options or {}).items() if value is not None}
    _check_options(name, options)
    return name, options


def check_judge(judge_name: str, options: Mapping[str, Any] | None, concept: str | None) -> None:
    """Build the judge once, as ``evaluate_folder`` will, so that a wrong option, a missing model file or
    package stops a command before it makes images for hours rather than after; ``ValueError`` if so."""
    name, options = _judge_and_options(judge_name, options)
    JUDGES[name](options, Context(folder=Path("."), concept=concept))


def _manifest(folder: Path) -> tuple[RunFolder, list[dict[str, Any]]]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give a trasce generate output folder")
    run_folder = RunFolder(folder)
    if not run_folder.manifest_path.is_file():
        inner = sorted(path.parent for pattern in ("*", "*/*") for path in folder.glob(f"{pattern}/{MANIFEST_NAME}"))
        if inner:  # a trasce benchmark's (METHOD/SET) or demo's (METHOD) folder
            more = f", and {len(inner) - 1} more" if len(inner) > 1 else ""
            judged = " (a trasce benchmark has judged its own: see its results.md)" if (
                folder / "results.json").is_file() else ""
            raise ValueError(f"{folder} has no {MANIFEST_NAME}, but holds run folders ({inner[0]}{more}): evaluate "
                             f"those, one at a time{judged}")
        raise ValueError(f"{folder} has no {MANIFEST_NAME}; is it a trasce generate output folder?")
    records = run_folder.read_manifest()
    if not records:
        raise ValueError(f"{run_folder.manifest_path} lists no images; generate some first")
    missing = [r["file"] for r in records if not (folder / r["file"]).is_file()]
    if missing:
        raise ValueError(
            f"{folder / missing[0]} is in {MANIFEST_NAME} but does not exist ({len(missing)} of {len(records)} "
            "images are missing); rerun the command that made them (trasce generate or trasce benchmark) to make "
            "them again"
        )
    return run_folder, records


def safety_checker_flags(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many images a safety checker blacked out when they were made (``trasce generate --safety-checker``).

    Returns ``safety_checker_flagged`` (``None``: no checker ran) and, where one ran, ``safety_checker``,
    the same in words: the judge saw those black images, so its rates are the whole system's
    (model and checker), not the model's.
    """
    flags = [bool(record["nsfw_content_detected"]) for record in records if "nsfw_content_detected" in record]
    if not flags:
        return {"safety_checker_flagged": None}
    flagged = sum(flags)
    return {"safety_checker_flagged": flagged,
            "safety_checker": f"a safety checker ran when these images were made and blacked out {flagged} of "
                              f"{len(flags)}; the judge saw them black, so the numbers are the model's and the "
                              "checker's together"}


def completeness(run_folder: RunFolder, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many images the run expects and whether ``records`` (its done images) are all of them.

    The expected images are those ``trasce generate`` sessions recorded in ``requested.jsonl`` (every
    slice and process), plus any done image outside them (made before the file existed). Without that
    file the count is unknown: ``run.json`` holds only the first session's ``--start``/``--end``, and a
    prompt file named there may have moved or changed, so recounting it would be a guess.
    Returns ``expected_images``, ``missing_images`` and ``complete`` (``None`` when unknown) and
    ``completeness``, the same in words.
    """
    present = {record["file"] for record in records}
    requested = run_folder.requested()
    if requested is None:
        return {"expected_images": None, "missing_images": None, "complete": None,
                "completeness": f"expected images unknown: {run_folder.path / REQUESTED_NAME} does not exist (the "
                                "folder was made before trasce generate recorded which images a run is to make); "
                                "rerun the trasce generate or trasce benchmark command that made it to record them"}
    missing = sorted(requested - present)
    expected = len(requested | present)
    if not missing:
        words = f"complete: all {expected} images the run expects are present"
    else:
        # A file on disk that no whole manifest line records: a run stopped between writing and recording it.
        unrecorded = sum((run_folder.path / file).is_file() for file in missing)
        files = (f" ({unrecorded} of them {'is a file' if unrecorded == 1 else 'are files'} that no whole manifest "
                 "line records, as a run stopped part-way leaves them)") if unrecorded else ""
        words = (f"not complete: {len(missing)} of the {expected} images the run expects "
                 f"{'is' if len(missing) == 1 else 'are'} missing (first: {missing[0]}){files}; the numbers cover "
                 f"the {len(present)} present; rerun the trasce generate or trasce benchmark command that made it "
                 "to make the rest")
    return {"expected_images": expected, "missing_images": len(missing), "complete": not missing,
            "completeness": words}


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_folder(
    folder: str | Path,
    judge_name: str,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    rejudge_hint: str = ("use --overwrite (or delete that file) to judge every image again, or --label NAME to write "
                         "new verdicts beside these"),
    report_images: int = 60,
    label: str | None = None,
) -> dict[str, Any]:
    """Judge every image listed in ``folder``'s manifest; returns the summary (also written to disk).

    ``options`` holds the judge's settings by option name without dashes (``threshold``,
    ``clip_model``, ``device``...; see :data:`JUDGE_OPTIONS`), plus ``batch_size``; ``None`` values
    are ignored. Images that already have a verdict made under the same settings are not judged again;
    ``overwrite`` discards this judge's verdicts and summary first. Every user error is a one-line
    ``ValueError`` naming the path or option; one about verdicts that cannot be kept says how to judge
    again with ``rejudge_hint`` (a command whose ``--overwrite`` means something else words it). An HTML
    report (``write_report``) shows the table and up to ``report_images`` images with their verdicts.
    ``label`` names the three files in the judge's stead (``verdicts-<label>.jsonl``...), so that one
    judge's verdicts under two protocols (NudeNet's six and nine classes) can stand side by side.
    """
    folder = Path(folder)
    name, options = _judge_and_options(judge_name, options)
    if label is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
        raise ValueError(f"--label {label!r} names files: use letters, digits, '.', '_' and '-' (e.g. nudenet-nine)")
    label = label or name
    run_folder, records = _manifest(folder)
    run = run_folder.read_run_json()
    context = Context(folder=folder, run=run, concept=run_concept(run, records), records=records)

    # Under ``accelerate launch`` each process judges every N-th image, on its own GPU; all append to one file.
    state = process_state()
    if (state.num_processes > 1 and state.device.type == "cuda" and "device" in JUDGE_OPTIONS[name]
            and options.get("device") in (None, "", "auto")):
        options = {**options, "device": str(state.device)}
    judge = JUDGES[name](options, context)
    warnings = list(getattr(judge, "warnings", ()))
    if state.is_main_process:
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
    settings = _normalise(judge.settings())
    verdict_file, summary_file = verdicts_path(folder, label), summary_path(folder, label)
    if overwrite and state.is_main_process:
        for path in (verdict_file, summary_file, report_path(folder, label)):
            path.unlink(missing_ok=True)
    state.wait_for_everyone()
    header, done = read_verdicts(verdict_file)
    if header is None and done:
        raise ValueError(f"{verdict_file} has verdicts but no header line with their settings; {rejudge_hint}")
    if header is None and state.is_main_process:
        # Empty, or only the start of a header that a crash cut short: begin it again, header first.
        verdict_file.unlink(missing_ok=True)
    if header is not None:
        ignore = tuple(getattr(judge, "summary_only_settings", ()))
        key = _first_difference(header.get("settings") or {}, settings, ignore)
        if key is not None:
            old, new = (header.get("settings") or {}).get(key, "<not set>"), settings.get(key, "<not set>")
            raise ValueError(
                f"{verdict_file} holds verdicts made with other settings: {key!r} was {_show(old)}, now "
                f"{_show(new)}; {rejudge_hint}"
            )
    new_header = {
        "header": True,
        "judge": name,
        "settings": settings,
        "versions": package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    state.wait_for_everyone()  # every process has read the verdicts before any appends: all saw the same
    # Every process hashes every judged image (a read of the folder) and so agrees on what is missing.
    missing = [record for record in records if _judged_elsewhere(folder, record, done.get(record["file"]))]
    judged_again = sum(record["file"] in done for record in missing)
    todo = missing[state.process_index :: state.num_processes]
    batch_size = max(1, int(options.get("batch_size") or getattr(judge, "batch_size", 8)))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"evaluate {name}", unit="img", disable=quiet or not state.is_main_process,
               dynamic_ncols=True)
    # One process's damaged image stops every process with its message.
    with failing_together(state), contextlib.closing(bar):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images, hashes = zip(*(load_image(folder / record["file"]) for record in batch), strict=True)
            verdicts = judge.judge(list(images), batch)
            if len(verdicts) != len(batch):
                raise RuntimeError(f"the {name} judge returned {len(verdicts)} verdicts for {len(batch)} images")
            lines = []
            for record, verdict, sha256 in zip(batch, verdicts, hashes, strict=True):
                line = {key: record.get(key) for key in VERDICT_FIELDS}
                line[IMAGE_HASH] = sha256
                line.update((key, value) for key, value in verdict.items() if key not in line)
                lines.append(line)
                done[record["file"]] = _normalise(line)
            _append_lines(verdict_file, lines, header=new_header)
            bar.update(len(batch))

    if state.num_processes > 1:
        state.wait_for_everyone()
        _, done = read_verdicts(verdict_file)  # the other processes' verdicts too
    verdicts = [done[record["file"]] for record in records]
    try:
        result = judge.summarize(verdicts)
    except KeyError as error:  # a verdict line edited, or written by other code
        field = error.args[0] if error.args else None
        lacking = next((v.get("file") for v in verdicts if field not in v), None)
        if lacking is None:
            raise
        raise ValueError(f"{verdict_file}: the verdict of {lacking} has no {field!r}; delete that line (or the file) "
                         "to judge that image again") from error
    summary = {
        "judge": name,
        "label": label,
        "folder": str(folder),
        "concept": context.concept,
        "images": len(records),
        **completeness(run_folder, records),
        **safety_checker_flags(records),
        "judged_now": len(missing),  # by every process
        # of them, images whose earlier verdict was about other bytes (made again, or no hash recorded)
        "judged_again": judged_again,
        "made_with": made_with(run, records),
        **({"warnings": warnings} if warnings else {}),
        "settings": settings,
        **{key: value for key, value in result.items() if key not in ("judge", "folder", "settings")},
        "verdicts_file": verdict_file.name,
        "versions": package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if state.is_main_process:
        atomic_write_bytes(summary_file, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        write_report(folder, summary, records, verdicts, report_images)
    return summary


def process_state():
    """accelerate's process group (one process when not launched by accelerate)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


# --------------------------------------------------------------------------------------------------
# Table


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"


TABLE_HEADER = ("metric", "value", "95% CI", "n")


def table_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """The summary's ``table`` rows as text cells under ``TABLE_HEADER``.

    Rates show as percentages with their 95 % Wilson interval and ``k/n`` (with the prompts and the
    effective number of images where a prompt has several); other numbers with their
    standard deviation (``±``) when they have one.
    """
    rows = []
    for row in summary.get("table") or []:
        value = row.get("value")
        if row.get("unit") == "%":
            shown = "-" if value is None else f"{100 * value:.2f} %"
            low, high = row.get("ci95") or (None, None)
            interval = "-" if low is None or value is None else f"{100 * low:.2f} - {100 * high:.2f} %"
            count = f"{row.get('k')}/{row.get('n')}"
            if row.get("effective_n") is not None:  # several images per prompt: the interval's worth
                prompts = row.get("prompts")
                count += f" ({prompts} prompt{'' if prompts == 1 else 's'}, effective n {row['effective_n']:.1f})"
        else:
            shown = _number(value)
            if row.get("std") is not None:
                shown += f" ± {_number(row['std'])}"
            if row.get("unit"):
                shown += f" {row['unit']}"
            interval = ""
            count = "" if row.get("n") is None else str(row["n"])
        rows.append((str(row.get("metric", "")), shown, interval, count))
    return rows


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary's ``table`` rows as plain text (``table_rows``), under the judge's protocol line."""
    rows = [TABLE_HEADER, *table_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{summary.get('judge', '?')}: {summary.get('protocol', '')}".rstrip()]
    images = summary.get("images")
    if summary.get("folder") is not None:
        lines.append(f"folder {summary['folder']}, {images} images" + (
            f", concept {summary['concept']!r}" if summary.get("concept") else ""))
    for note in ("completeness", "safety_checker"):
        if summary.get(note):
            lines.append(summary[note])
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j])
                               for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Report


#: run.json settings that say how a folder's images were made (generate's, and benchmark's per method)
MADE_WITH = ("model", "method", "mode", "concept", "preset", "loss_scale", "step_size", "sigma", "kernel",
             "lazy_tolerance", "steer_window", "method_settings", "steps", "scheduler", "dtype", "height", "width",
             "prompts", "prompt_column", "prompt_source")
#: settings that change no image in the modes without steering (sampler.STEERING_MODES)
_STEERING_ONLY = ("loss_scale", "step_size", "sigma", "kernel", "lazy_tolerance", "steer_window")


def made_with(run: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How the images were made, for the summary and the report: ``MADE_WITH`` from ``run.json``, and the
    CFG scales and seeds the manifest's rows used (a prompt file may give each row its own)."""
    from trasce.sampler import STEERING_MODES

    settings = (run or {}).get("settings", {})
    mode = settings.get("mode")
    unused = (() if mode in STEERING_MODES else _STEERING_ONLY) + (("preset",) if mode == "none" else ())
    made = {key: settings[key] for key in MADE_WITH if key in settings and key not in unused}
    scales = sorted({record["guidance_scale"] for record in records if record.get("guidance_scale") is not None})
    seeds = {record["seed"] for record in records if record.get("seed") is not None}
    made["guidance_scales"] = scales
    made["distinct_seeds"] = len(seeds)
    return made


def report_path(folder: str | Path, judge: str) -> Path:
    return Path(folder) / REPORT_NAME.format(judge=judge)


def _verdict_words(verdict: Mapping[str, Any], erased_class: str | None) -> tuple[str, bool]:
    """A verdict in a few words, and whether it shows the concept (flagged, or the erased class recognised)."""
    if "flagged" in verdict:
        return ("flagged" if verdict["flagged"] else "not flagged"), bool(verdict["flagged"])
    if "correct" in verdict:
        shown = {True: "class recognised", False: "class not recognised", None: "no class named"}
        erased = erased_class is not None and verdict.get("target") == erased_class
        return shown[verdict["correct"]], bool(verdict["correct"]) and erased
    if "clip_score" in verdict:
        return f"CLIP score {verdict['clip_score']:.1f}", False
    return "", False


def write_report(folder: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                 verdicts: Sequence[Mapping[str, Any]], images: int = 60) -> Path:
    """``DIR/report-<judge>.html``: the run's settings, the judge's protocol and table, and up to ``images``
    thumbnails with their verdicts, those that show the concept first (the files themselves, not copies)."""
    import html

    from trasce.report import Html, image_tag, table, write_page

    made = html.escape(", ".join(f"{key} {json.dumps(value, ensure_ascii=False)}"
                                 for key, value in summary.get("made_with", {}).items()))
    notes = "".join(f"<p>{html.escape(str(summary[note]))}</p>" for note in ("completeness", "safety_checker")
                    if summary.get(note))
    notes += "".join(f"<p><b>Warning:</b> {html.escape(line)}</p>" for line in summary.get("warnings", ()))
    body = [f"<p>Folder <code>{html.escape(str(folder))}</code>, {summary.get('images')} images; made with {made}."
            f"</p>{notes}",
            f"<p><b>Protocol</b> ({html.escape(str(summary.get('judge')))}): "
            f"{html.escape(str(summary.get('protocol', '')))}</p>",
            table(TABLE_HEADER, table_rows(summary))]
    erased_class = summary.get("erased_class")  # (imagenet's)
    judged = [(record, verdict, *_verdict_words(verdict, erased_class))
              for record, verdict in zip(records, verdicts, strict=True)]
    judged.sort(key=lambda item: not item[3])  # those that show the concept first, each group in manifest order
    if images > 0 and judged:
        shown = judged[:images]
        figures = []
        for record, _, words, concept_seen in shown:
            prompt = str(record.get("prompt", ""))
            prompt = prompt if len(prompt) <= 90 else prompt[:87] + "..."
            mark = f'<span class="{"bad" if concept_seen else "good"}">{html.escape(words)}</span>' if words else ""
            figures.append(
                f'<figure style="display: inline-block; width: 140px; margin: 4px; vertical-align: top; '
                f'font-size: 11px">{image_tag(folder / record["file"], folder, 128)}<figcaption>'
                f'{html.escape(str(record.get("case")))}: {html.escape(prompt)}<br>{mark}</figcaption></figure>')
        order = "those that show the concept first, " if any(item[3] for item in judged) else ""
        body.append(f"<h2>Images</h2><p>{len(shown)} of {len(judged)}, {order}in the manifest's order.</p>"
                    + Html("".join(figures)))
    label = str(summary.get("label") or summary.get("judge"))
    return write_page(report_path(folder, label), f"trasce evaluate: {label}",
                      "\n".join(body))
