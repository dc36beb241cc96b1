"""``trasce demo``: erasure on the embedded model, judged, as a grid and an HTML report.

Generates a handful of prompts three ways (unprotected, conventional negative prompt, TraSCE)
with the same seeds, judges every image with the embedded judge and writes ``grid.png`` and
``report.html``. Every image goes through ``trasce generate``'s resumable folders, so a second
run only rebuilds the report.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from trasce.generate import GenerateOptions, run
from trasce.report import Html, grid, image_tag, save_png, table, write_page
from trasce.runs import check_run_place

DEMO_CONCEPT = "circle"
DEMO_PROMPTS = (
    "a red circle",
    "a striped blue disc on a white background",
    "a round shape",
    "circle",  # the paper's corner case: the prompt is the concept
    "a yellow star",
    "a green square on a black background",
    "a hollow purple triangle",
    "an orange plus sign",
)
METHODS = (("none", "unprotected"), ("negative_prompt", "negative prompt"), ("trasce", "TraSCE"))


def demo(out: Path, concept: str = DEMO_CONCEPT, prompts: tuple[str, ...] = DEMO_PROMPTS, steps: int | None = None,
         seed: int = 1, device: str = "auto", quiet: bool = False, overwrite: bool = False) -> Path:
    """Run the demo into ``out``; return the report's path. ``overwrite`` starts its run folders afresh
    (a rerun with other settings is refused without it).

    ``concept`` must be a value of the embedded world (a shape, colour, fill or background, or an
    alias of one), which the judge can see: ``ValueError`` listing them otherwise.
    """
    from PIL import Image

    from trasce.benchmark import PRESET_FOR_ATTRIBUTE, toy_target
    from trasce.eval.toy import mention_kind
    from trasce.toy.judge import Judge

    started = time.perf_counter()
    check_run_place(out, "trasce demo", holds_runs=True)
    attribute, value = toy_target(concept)
    folders = {}
    for mode, _ in METHODS:
        options = GenerateOptions(out=out / mode, model="toy", concept=concept,
                                  preset=PRESET_FOR_ATTRIBUTE.get(attribute, "toy-shape"), mode=mode,
                                  prompt=list(prompts), seed=seed, steps=steps, device=device, quiet=quiet,
                                  batch_size=len(prompts), overwrite=overwrite)
        folders[mode] = run(options)

    judge = Judge.load()
    cells, rows = [], []
    asks = [mention_kind(prompt, attribute, value) != "none" for prompt in prompts]
    counts = {mode: [0, 0] for mode, _ in METHODS}  # images showing the concept: [prompts asking for it, others]
    records = {mode: {r["case"]: r for r in folders[mode].read_manifest()} for mode, _ in METHODS}
    for i, prompt in enumerate(prompts):
        images, row = [], [prompt]
        for mode, _ in METHODS:
            record = records[mode][f"{i:05d}"]  # generate names --prompt rows by position
            path = folders[mode].path / record["file"]
            image = Image.open(path).convert("RGB")
            verdict = judge.classify_pil([image])[0]
            present = verdict[attribute] == value
            counts[mode][0 if asks[i] else 1] += present
            images.append(image)
            words = f"{verdict['color']} {verdict['fill']} {verdict['shape']} on {verdict['background']}"
            mark = f'<span class="bad">{html.escape(value)}</span>' if present else '<span class="good">no</span>'
            asked = html.escape(f"{attribute}={value}?")
            row.append(Html(f"{image_tag(path, out, 96)}<br>{html.escape(words)}<br>{asked} {mark}"))
        cells.append(images)
        rows.append(row)

    picture = save_png(grid(cells, row_labels=prompts, column_labels=[label for _, label in METHODS], cell=120),
                       out / "grid.png")
    n_ask = sum(asks)
    summary = table(["method", f"images with {attribute} = {value}: of the {n_ask} prompts asking for it",
                     f"of the {len(prompts) - n_ask} others"],
                    [[label, *counts[mode]] for mode, label in METHODS])
    used = folders["trasce"].read_run_json()["settings"]
    body = (
        f"<p>Embedded model, concept to erase: <code>{html.escape(concept)}</code>. Same seed ({seed}) in every "
        f"column; {used['steps']} steps of {used['scheduler']}, CFG {used['guidance_scale']:g}. The negative "
        f"prompt is the concept's text; TraSCE uses preset <code>{html.escape(str(used['preset']))}</code> "
        f"(λ {used['loss_scale']:g}, η {used['step_size']:g}, σ {used['sigma']:g}). Verdicts by the embedded "
        "judge (shape, colour, fill, background); this small model does not follow background words, so an "
        "image's background often differs from the one its prompt asks for.</p>"
        f"{summary}<p>{image_tag(picture, out)}</p>"
        + table(["prompt", *[label for _, label in METHODS]], rows)
    )
    report = write_page(out / "report.html", f"trasce demo: erasing '{concept}'", body)
    if not quiet:
        for mode, label in METHODS:
            print(f"{label:>16}: {attribute} = {value} in {counts[mode][0]} of the {n_ask} images whose prompt asks "
                  f"for it, {counts[mode][1]} of the {len(prompts) - n_ask} others")
        print(f"report: {report}\ngrid:   {picture}\ntook {time.perf_counter() - started:.0f} s (a rerun "
              "only rebuilds the report)")
    return report
