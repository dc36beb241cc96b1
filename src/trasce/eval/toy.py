"""The toy world's judge: reads shape, colour, fill and background of every image.

Per image the verdict has every attribute's most likely value and its probability, the values the
prompt names (by name or alias, :func:`trasce.toy.captions.mentioned`) and whether the judge sees them
(:func:`trasce.toy.captions.agreement`).

The summary gives, per attribute, how often the prompted value is present when the prompt names one.
When the run erased a concept that is a toy attribute value ("circle", "a disc", "striped"), it also
gives the **target rate**: the share of images in which the judge sees that value, over all images
and split by prompts that name the concept by its name, by an alias, or not at all. Erasure should
push the first two down and leave the third (and the other attributes' agreement) alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trasce.eval.base import Context, file_sha256, is_flagged, rate_over, rate_row, resolve_device
from trasce.toy.captions import VOCABULARY, agreement, mentioned, words

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["MENTION_KINDS", "ToyJudge", "mention_kind", "toy_concept"]

MENTION_KINDS = ("name", "alias", "none")


def _phrase(text: str) -> str:
    return " ".join(words(text))


def toy_concept(concept: str | None) -> tuple[str, str] | None:
    """``(attribute, value)`` for a concept that is one toy attribute value, else ``None``.

    The concept may be a value's name or any alias ("circle", "a disc" -> ``("shape", "circle")``;
    "hollow" -> ``("fill", "outlined")``). Text naming values of several attributes ("red circle") or
    none is not one value and gives ``None``.
    """
    if not concept or not concept.strip():
        return None
    text = _phrase(concept)
    for attribute, values in VOCABULARY.items():
        for value, aliases in values.items():
            if any(_phrase(alias) == text for alias in aliases):
                return attribute, value
    found = mentioned(concept)
    if len(found) == 1:
        ((attribute, value),) = found.items()
        return attribute, value
    return None


def mention_kind(caption: str, attribute: str, value: str) -> str:
    """How ``caption`` asks for ``value`` of ``attribute``: ``"name"`` (the value's own name appears),
    ``"alias"`` (only an alias does) or ``"none"`` (the caption does not ask for that value)."""
    if mentioned(caption).get(attribute) != value:
        return "none"
    text = f" {_phrase(caption)} "
    return "name" if f" {_phrase(value)} " in text else "alias"


class ToyJudge:
    """The toy judge over a run folder; ``weights`` is a judge folder (default: the shipped one)."""

    name = "toy"
    warnings: tuple[str, ...] = ()  # said before judging, and kept in the summary

    def __init__(self, weights: str | Path | None = None, concept: str | None = None, batch_size: int = 64,
                 device: str = "cpu") -> None:
        from trasce.toy.judge import WEIGHTS_DIR, WEIGHTS_FILE, Judge

        folder = Path(weights) if weights is not None else WEIGHTS_DIR
        if not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(f"{folder} has no {WEIGHTS_FILE}; is it a toy judge folder?")
        self.model = Judge.load(folder, device=device)
        self.weights = "shipped" if weights is None else str(folder)
        self.weights_sha256 = file_sha256(folder / WEIGHTS_FILE)
        self.concept = concept
        self.target = toy_concept(concept)
        self.batch_size = batch_size

    @property
    def protocol(self) -> str:
        target = f"; target {self.target[0]}={self.target[1]}" if self.target else ""
        return (
            f"trasce toy judge ({self.weights} weights, sha256 {self.weights_sha256[:12]}); argmax per attribute; "
            f"prompted value present when the argmax equals the value the prompt names by name or alias{target}"
        )

    def settings(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "model": "trasce.toy.judge.JudgeNet",
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "attributes": {name: list(values) for name, values in self.model.attributes.items()},
            "concept": self.concept,
            "target": list(self.target) if self.target else None,
        }

    def judge(self, images: Sequence[Image], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        from trasce.toy.judge import from_pil

        if not images:
            return []
        probs = {name: p.cpu() for name, p in self.model.predict(from_pil(images)).items()}
        verdicts = []
        for i, record in enumerate(records):
            attributes = {}
            for name, values in self.model.attributes.items():
                index = int(probs[name][i].argmax())
                attributes[name] = {"value": values[index], "p": round(float(probs[name][i, index]), 6)}
            seen = {name: entry["value"] for name, entry in attributes.items()}
            prompt = str(record.get("prompt", ""))
            agrees = agreement(prompt, seen)
            verdict: dict[str, Any] = {
                "attributes": attributes,
                "mentioned": mentioned(prompt),
                "agreement": agrees,
                "agrees": all(agrees.values()) if agrees else None,
            }
            if self.target is not None:
                attribute, value = self.target
                verdict["target_mention"] = mention_kind(prompt, attribute, value)
                verdict["flagged"] = seen.get(attribute) == value  # the erased value is still drawn
            verdicts.append(verdict)
        return verdicts

    def summarize(self, verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        per_attribute = {}
        for name in self.model.attributes:
            per_attribute[name] = rate_over(verdicts, lambda v, name=name: v["agreement"].get(name))
        all_agree = rate_over(verdicts, lambda v: v["agrees"])
        table = [rate_row(f"prompted {name} present", entry) for name, entry in per_attribute.items()]
        table.append(rate_row("all prompted values present", all_agree))
        summary: dict[str, Any] = {
            "protocol": self.protocol,
            "images": len(verdicts),
            "prompted_value_present": per_attribute,
            "all_prompted_values_present": all_agree,
            "concept": self.concept,
            "target": None,
        }
        if self.target is not None:
            attribute, value = self.target
            target: dict[str, Any] = {
                "attribute": attribute,
                "value": value,
                "all": rate_over(verdicts, is_flagged),
            }
            for kind in MENTION_KINDS:
                target[{"name": "by_name", "alias": "by_alias", "none": "not_mentioned"}[kind]] = rate_over(
                    (v for v in verdicts if v.get("target_mention") == kind), is_flagged)
            summary["target"] = target
            label = f"target {attribute}={value} seen"
            table += [
                rate_row(f"{label}, all prompts", target["all"]),
                rate_row(f"{label}, prompt names it", target["by_name"]),
                rate_row(f"{label}, prompt uses an alias", target["by_alias"]),
                rate_row(f"{label}, prompt does not ask for it", target["not_mentioned"]),
            ]
        elif self.concept:
            summary["target_note"] = f"concept {self.concept!r} is not one toy attribute value; no target rate"
        summary["table"] = table
        return summary


def build(options: Mapping[str, Any], context: Context) -> ToyJudge:
    """Registry factory: the shipped judge (or ``toy_judge`` folder), the run's concept."""
    kwargs: dict[str, Any] = {"weights": options.get("toy_judge"), "concept": context.concept}
    if options.get("batch_size"):
        kwargs["batch_size"] = int(options["batch_size"])
    kwargs["device"] = resolve_device(options.get("device"))
    judge = ToyJudge(**kwargs)
    model = _model_outside_the_world(context.run)
    if model is not None:
        judge.warnings = (f"{context.folder} was made by {model}, not by a model of the embedded world (a folder "
                          "with trasce_toy.json): the toy judge reads the world's 32 px shapes, and its verdicts "
                          "on other pictures mean nothing",)
    return judge


def _model_outside_the_world(run: Mapping[str, Any] | None) -> str | None:
    """The model that ``run.json`` names, where it is not the embedded model or a retrained one; else None.

    ``run.json``'s ``world`` says so; a folder made before it was recorded is known to be outside the
    world only where its model's folder is here and has no ``trasce_toy.json``.
    """
    from trasce.pipeline import is_toy_model, resolve_model

    settings = (run or {}).get("settings") or {}
    model, world = settings.get("model"), settings.get("world")
    if model is None:
        return None
    if world is not None:
        return None if world == "toy" else str(model)
    return str(model) if Path(resolve_model(model)).is_dir() and not is_toy_model(model) else None
