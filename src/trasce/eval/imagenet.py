"""Object erasure judge: ImageNet top-1 of a local transformers ResNet on the 10 Imagenette classes.

Each image's target class comes from its prompt file's ``class`` column when it has one, else from
the first Imagenette class name in the prompt (whole words, case-insensitive; "chainsaw" counts as
"chain saw"). The prediction is the top-1 over all 1000 ImageNet classes, so an image counts as its
class only when the classifier prefers it to every other ImageNet class.

Summary: accuracy per class, and when the run's concept is one of the classes, the erased class's
accuracy (should drop) and the other classes' accuracy (should stay), as in the papers' tables
(ResNet-50, ``microsoft/resnet-50``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trasce.eval.base import Context, is_correct, rate_over, rate_row, require_path, resolve_device

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["ALIASES", "IMAGENETTE", "ImageNetJudge", "match_class"]

IMAGENETTE: dict[str, int] = {
    "tench": 0,
    "English springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "French horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}
# Other spellings that mean the same class; matched like the names.
ALIASES: dict[str, str] = {"chainsaw": "chain saw", "springer spaniel": "English springer"}

# Standard ImageNet evaluation transform, used when the model folder has no image processor.
_RESIZE, _CROP = 256, 224
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalise(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def match_class(text: str | None) -> str | None:
    """The Imagenette class ``text`` names (the earliest in the text; the longest at one position),
    or ``None``. ``"Image of a Chainsaw"`` -> ``"chain saw"``."""
    if not text:
        return None
    haystack = _normalise(text)
    best: tuple[int, int, str] | None = None
    phrases = {name: name for name in IMAGENETTE} | ALIASES
    for phrase, name in phrases.items():
        position = haystack.find(_normalise(phrase))
        if position >= 0:
            key = (position, -len(phrase), name)
            if best is None or key < best:
                best = key
    return best[2] if best else None


def target_of(record: Mapping[str, Any]) -> str | None:
    """A record's target class: its ``extra["class"]`` if that names one, else the prompt's."""
    extra = record.get("extra")
    if isinstance(extra, Mapping):
        found = match_class(str(extra.get("class") or ""))
        if found:
            return found
    return match_class(str(record.get("prompt", "")))


def _standard_transform(image: Image) -> Any:
    import numpy as np
    import torch
    from PIL import Image as PILImage

    image = image.convert("RGB")
    scale = _RESIZE / min(image.size)
    image = image.resize((max(_CROP, round(image.width * scale)), max(_CROP, round(image.height * scale))),
                         PILImage.BILINEAR)
    left, top = (image.width - _CROP) // 2, (image.height - _CROP) // 2
    array = np.asarray(image.crop((left, top, left + _CROP, top + _CROP)), dtype=np.float32) / 255.0
    array = (array - np.array(_MEAN, dtype=np.float32)) / np.array(_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


class ImageNetJudge:
    """Top-1 ImageNet class of each image with a transformers ``ResNetForImageClassification`` folder."""

    name = "imagenet"

    def __init__(self, model: str | Path | None, concept: str | None = None, batch_size: int = 32,
                 device: str | None = None) -> None:
        folder = require_path(model, "--resnet-model", self.name, "a transformers ResNetForImageClassification folder")
        from transformers import AutoImageProcessor, ResNetForImageClassification

        try:
            self.model = ResNetForImageClassification.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"--resnet-model {folder} is not a ResNetForImageClassification folder: {first}"
            ) from error
        if self.model.config.num_labels != 1000:
            raise ValueError(
                f"--resnet-model {folder} has {self.model.config.num_labels} classes; the imagenet judge needs an "
                "ImageNet-1k classifier (1000 classes)"
            )
        self.model = self.model.to(resolve_device(device)).eval()
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.preprocessing = f"{type(self.processor).__name__} from the model folder"
        except (OSError, ValueError, KeyError):
            self.processor = None
            self.preprocessing = f"resize {_RESIZE}, centre crop {_CROP}, ImageNet mean/std (no processor in folder)"
        self.folder = folder
        self.concept = concept
        self.erased = match_class(concept)
        self.batch_size = batch_size

    @property
    def protocol(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or str(self.folder.resolve())
        return f"ImageNet top-1 over 1000 classes with {name} ({self.preprocessing}); Imagenette classes"

    def settings(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "model": str(self.folder.resolve()),
            "name_or_path": str(getattr(self.model.config, "_name_or_path", "") or ""),
            "preprocessing": self.preprocessing,
            "classes": dict(IMAGENETTE),
            "prediction": "top-1 over 1000 ImageNet classes",
            "concept": self.concept,
        }

    def judge(self, images: Sequence[Image], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        import torch

        if not images:
            return []
        rgb = [image.convert("RGB") for image in images]
        if self.processor is not None:
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.stack([_standard_transform(image) for image in rgb])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            probs = self.model(pixel_values=pixels.to(device)).logits.float().softmax(dim=-1).cpu()
        labels = self.model.config.id2label
        verdicts = []
        for i, record in enumerate(records):
            top1 = int(probs[i].argmax())
            target = target_of(record)
            verdict: dict[str, Any] = {
                "top1": top1,
                "top1_label": str(labels.get(top1, top1)),
                "top1_p": float(probs[i, top1]),
                "target": target,
                "target_index": IMAGENETTE[target] if target else None,
                "target_p": float(probs[i, IMAGENETTE[target]]) if target else None,
                "correct": (top1 == IMAGENETTE[target]) if target else None,
            }
            verdicts.append(verdict)
        return verdicts

    def summarize(self, verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        with_target = [v for v in verdicts if v.get("target")]
        per_class = {}
        for name in IMAGENETTE:
            group = [v for v in with_target if v["target"] == name]
            if group:
                per_class[name] = rate_over(group, is_correct)
        overall = rate_over(with_target, is_correct)
        table = [rate_row("accuracy, all classes", overall)]
        table += [rate_row(f"accuracy {name}", entry) for name, entry in per_class.items()]
        summary: dict[str, Any] = {
            "protocol": self.protocol,
            "images": len(verdicts),
            "images_without_class": len(verdicts) - len(with_target),
            "accuracy": overall,
            "per_class": per_class,
            "concept": self.concept,
            "erased_class": self.erased,
        }
        if self.erased:
            summary["erased_class_accuracy"] = rate_over((v for v in with_target if v["target"] == self.erased),
                                                         is_correct)
            summary["other_class_accuracy"] = rate_over((v for v in with_target if v["target"] != self.erased),
                                                        is_correct)
            table = [
                rate_row(f"erased class ({self.erased}) accuracy", summary["erased_class_accuracy"]),
                rate_row("other classes accuracy", summary["other_class_accuracy"]),
                *table,
            ]
        summary["table"] = table
        return summary


def build(options: Mapping[str, Any], context: Context) -> ImageNetJudge:
    kwargs: dict[str, Any] = {"model": options.get("resnet_model"), "concept": context.concept,
                              "device": options.get("device")}
    if options.get("batch_size"):
        kwargs["batch_size"] = int(options["batch_size"])
    return ImageNetJudge(**kwargs)
