"""CLIP score of each image against its own prompt, with a local transformers CLIP folder.

``score = 100 * max(cos(image embedding, text embedding), 0)``, as torchmetrics' ``CLIPScore`` and the
papers' tables compute it (SD v1.4 on COCO: about 31). The prompt is truncated to the text model's
length (77 tokens for OpenAI CLIP). The papers use ViT-L/14 (``openai/clip-vit-large-patch14``); the
summary names the folder and architecture so results under another CLIP are not mistaken for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trasce.eval.base import Context, embeddings, load_clip, mean_entry, value_row

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["SCALE", "ClipScoreJudge"]

SCALE = "100 * max(cos(image, text), 0)"


def describe_clip(model: Any, folder: Path) -> dict[str, Any]:
    """What identifies a CLIP checkpoint in settings: folder, hub name if known, sizes."""
    config = model.config
    return {
        "folder": str(folder.resolve()),
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "projection_dim": int(config.projection_dim),
        "image_size": int(config.vision_config.image_size),
        "patch_size": int(config.vision_config.patch_size),
        "vision_layers": int(config.vision_config.num_hidden_layers),
        "max_text_tokens": int(config.text_config.max_position_embeddings),
    }


class ClipScoreJudge:
    """CLIP score per image vs its prompt; ``model`` is a transformers CLIP folder."""

    name = "clip"

    def __init__(self, model: str | Path | None, batch_size: int = 16, device: str | None = None) -> None:
        self.model, self.processor, self.folder = load_clip(model, self.name, device)
        self.clip = describe_clip(self.model, self.folder)
        self.batch_size = batch_size

    @property
    def protocol(self) -> str:
        return (
            f"CLIP score = {SCALE} per image vs its prompt (truncated to {self.clip['max_text_tokens']} tokens); "
            f"CLIP {self.clip['name_or_path'] or self.clip['folder']}"
        )

    def settings(self) -> dict[str, Any]:
        return {"judge": self.name, "clip": self.clip, "scale": SCALE, "text": "the image's prompt"}

    def judge(self, images: Sequence[Image], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        import torch

        if not images:
            return []
        prompts = [str(record.get("prompt", "")) for record in records]
        inputs = self.processor(
            text=prompts, images=[image.convert("RGB") for image in images], return_tensors="pt", padding=True,
            truncation=True, max_length=self.clip["max_text_tokens"],
        )
        device = next(self.model.parameters()).device
        with torch.no_grad():
            image_emb = embeddings(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
            text_emb = embeddings(self.model.get_text_features(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            ))
        cosine = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).cpu()
        return [{"cosine": float(c), "clip_score": 100.0 * max(float(c), 0.0)} for c in cosine]

    def summarize(self, verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        stats = mean_entry([float(v["clip_score"]) for v in verdicts])
        return {
            "protocol": self.protocol,
            "scale": SCALE,
            "images": len(verdicts),
            "clip_score": stats,
            "table": [value_row("CLIP score (mean ± std)", stats["mean"], stats["n"], stats["std"])],
        }


def build(options: Mapping[str, Any], context: Context) -> ClipScoreJudge:
    kwargs: dict[str, Any] = {"model": options.get("clip_model"), "device": options.get("device")}
    if options.get("batch_size"):
        kwargs["batch_size"] = int(options["batch_size"])
    return ClipScoreJudge(**kwargs)
