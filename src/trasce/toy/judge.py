"""The judge: a small CNN that reads all four attributes of a toy-world image, shipped with the package.

    python -m trasce.toy.judge --out judge-train          # about 5 minutes on one CPU thread

Erasure metrics on the toy model ask "is the erased shape still drawn?", so they need a classifier
that is right on the renderer's own images and stays right on what a diffusion model outputs, which
is the same world seen through a little noise, blur, colour drift and clipping. Every step draws and
renders fresh scenes (no data set, so no overfitting to one), then perturbs them with that kind of
noise; the shipped weights are stored in float16 and the accuracy written next to them is measured
after reloading, so the number in ``judge.json`` describes the file that ships.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from trasce.toy import world

# ---- hyper-parameters -------------------------------------------------------------------------
CHANNELS = (32, 64, 96)  # one stage per resolution: 32, 16 and 8 pixels
STEPS = 600
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WARMUP_STEPS = 30
WEIGHT_DECAY = 1e-4
SEED = 0
EVAL_SEED = 1234  # far from any training seed; scenes are continuous, so no image repeats anyway
EVAL_IMAGES = 2000
# Augmentation, in [-1, 1] pixel units: mild enough that no two attribute values are confused
# (orange vs yellow differ by 0.6 in green, gray vs black background by 0.8).
AUG_PROB = 0.8  # the rest stay clean so the clean images are learnt exactly
NOISE_MAX = 0.1  # gaussian pixel noise, sigma drawn uniformly in [0, NOISE_MAX]
BRIGHTNESS = 0.08
CONTRAST = 0.15
CHANNEL_SHIFT = 0.04
BLUR_PROB = 0.3
SATURATE_PROB = 0.1
# -----------------------------------------------------------------------------------------------

WEIGHTS_DIR = Path(__file__).parent / "weights" / "judge"
WEIGHTS_FILE = "judge.safetensors"
CONFIG_FILE = "judge.json"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class JudgeNet(nn.Module):
    """Shared convolutional trunk and one linear head per attribute of :data:`world.ATTRIBUTES`.

    The first stage is a single conv at full resolution: stripes (2 bare rows in 6) and outlines
    (2 pixels wide) must be seen before any pooling, and one layer is enough to see them.
    """

    def __init__(self, channels: Sequence[int] = CHANNELS, attributes: dict[str, Sequence[str]] | None = None):
        super().__init__()
        attributes = dict(world.ATTRIBUTES if attributes is None else attributes)
        c1, c2, c3 = channels
        self.trunk = nn.Sequential(
            _conv_block(3, c1),
            nn.MaxPool2d(2),
            _conv_block(c1, c2),
            _conv_block(c2, c2),
            nn.MaxPool2d(2),
            _conv_block(c2, c3),
            _conv_block(c3, c3),
        )
        # Mean and max pooling: the mean sees proportions (background, fill), the max sees the
        # strongest local evidence (a star's point), and neither depends on where the shape sits.
        self.heads = nn.ModuleDict({name: nn.Linear(2 * c3, len(values)) for name, values in attributes.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` in ``[-1, 1]`` to the pooled trunk features ``(B, 2 * channels[-1])`` the heads read."""
        features = self.trunk(images)
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, 32, 32)`` in ``[-1, 1]`` to logits ``{attribute: (B, n_values)}``."""
        pooled = self.features(images)
        return {name: head(pooled) for name, head in self.heads.items()}


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate ``(B, 3, H, W)`` and area-resize to the world's size; float32 out."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    images = images.float()
    size = world.IMAGE_SIZE
    if images.shape[-2:] != (size, size):
        # Area averaging is the renderer's own anti-aliasing, so a 64 px image of the world
        # resizes to (almost) exactly its 32 px rendering.
        images = F.interpolate(images, size=(size, size), mode="area")
    return images


class Judge:
    """A trained :class:`JudgeNet` with the value names, ready for inference::

        judge = Judge.load()
        judge.classify(world.render(world.sample_scenes(2, torch.Generator().manual_seed(0))))
        # [{"shape": "star", "color": "blue", "fill": "solid", "background": "black"}, ...]
    """

    def __init__(self, net: JudgeNet, attributes: dict[str, Sequence[str]], config: dict | None = None):
        self.net = net.eval()
        self.attributes = {name: tuple(values) for name, values in attributes.items()}
        self.config = config or {}

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @classmethod
    def load(cls, path: str | Path | None = None, device: torch.device | str = "cpu") -> Judge:
        """Load ``judge.safetensors`` and ``judge.json`` from ``path`` (default: the shipped weights).

        Reads local files only; the float16 weights are widened to float32.
        """
        folder = Path(path) if path is not None else WEIGHTS_DIR
        config = json.loads((folder / CONFIG_FILE).read_text())
        attributes = config["attributes"]
        net = JudgeNet(channels=config["architecture"]["channels"], attributes=attributes)
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / WEIGHTS_FILE).items()}
        net.load_state_dict(state)
        return cls(net.to(device), attributes, config)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1024) -> dict[str, torch.Tensor]:
        """Per-attribute probabilities ``{attribute: (B, n_values)}`` on the judge's device.

        ``images`` is ``(B, 3, H, W)`` in ``[-1, 1]``; sizes other than 32 are area-resized to 32.
        Raises ``ValueError`` on any other shape.
        """
        images = _check_images(images)
        if len(images) == 0:
            return {name: torch.zeros(0, len(values)) for name, values in self.attributes.items()}
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in self.attributes}
        for start in range(0, len(images), batch_size):
            logits = self.net(images[start : start + batch_size].to(self.device))
            for name in self.attributes:
                chunks[name].append(logits[name].softmax(dim=-1))
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """The penultimate features ``(B, F)`` (mean- and max-pooled trunk, ``F = 192``) on the judge's device.

        What every attribute head reads; used as a small stand-in for Inception features (a toy-world
        FID). ``images`` as in :meth:`predict`.
        """
        images = _check_images(images)
        width = next(iter(self.net.heads.values())).in_features
        chunks = [self.net.features(images[start : start + batch_size].to(self.device))
                  for start in range(0, len(images), batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, width, device=self.device)

    def classify(self, images: torch.Tensor) -> list[dict[str, str]]:
        """The most likely value name of each attribute, one dict per image of ``(B, 3, H, W)``."""
        probs = self.predict(images)
        indices = {name: p.argmax(dim=-1).tolist() for name, p in probs.items()}
        return [
            {name: self.attributes[name][indices[name][i]] for name in self.attributes}
            for i in range(len(images))
        ]

    def classify_pil(self, images: Sequence) -> list[dict[str, str]]:
        """:meth:`classify` for PIL images of any size and mode (converted to RGB)."""
        return self.classify(from_pil(images)) if images else []


def from_pil(images: Sequence) -> torch.Tensor:
    """PIL images of any size and mode as ``(B, 3, 32, 32)`` in ``[-1, 1]``, each converted to RGB and
    area-resized to the world's size, as the judge reads them."""
    tensors = [torch.zeros(0, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)]
    for image in images:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
        tensors.append(_check_images(torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1))
    return torch.cat(tensors)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perturb ``(B, 3, 32, 32)`` world images the way a diffusion model's samples differ from them.

    One-pixel shifts, slight blur, brightness/contrast/colour drift, gaussian noise, and a few images
    saturated and clipped to ``[-1, 1]``; a share ``1 - AUG_PROB`` is left untouched.
    """
    b = len(images)

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    out = images.clone()
    # Shift by at most one pixel each way; replicate padding because the border is background.
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    shifts = torch.randint(3, (b, 2), generator=generator)
    size = images.shape[-1]
    for dy in range(3):
        for dx in range(3):
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[mask] = padded[mask, :, dy : dy + size, dx : dx + size]

    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = (uniform(b) < BLUR_PROB) * uniform(b, high=0.7)
    out = out + (blurred - out) * blur[:, None, None, None]

    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(b, 1, 1, 1, low=1 - CONTRAST, high=1 + CONTRAST)
    out = mean + (out - mean) * contrast
    out = out + uniform(b, 1, 1, 1, low=-BRIGHTNESS, high=BRIGHTNESS)
    out = out + uniform(b, 3, 1, 1, low=-CHANNEL_SHIFT, high=CHANNEL_SHIFT)
    out = out + torch.randn(out.shape, generator=generator) * uniform(b, 1, 1, 1, high=NOISE_MAX)

    saturate = uniform(b) < SATURATE_PROB
    out[saturate] = (out[saturate] * uniform(int(saturate.sum()), 1, 1, 1, low=1.1, high=1.5)).clamp(-1, 1)

    keep = uniform(b) >= AUG_PROB
    out[keep] = images[keep]
    return out


@torch.no_grad()
def accuracy(judge: Judge, n: int = EVAL_IMAGES, seed: int = EVAL_SEED, noise: float = 0.0) -> dict[str, float]:
    """Share of ``n`` freshly rendered scenes (from ``seed``) whose attributes the judge gets right.

    ``noise`` adds gaussian pixel noise of that sigma (unclipped), as a robustness check.
    """
    generator = torch.Generator().manual_seed(seed)
    correct = dict.fromkeys(judge.attributes, 0)
    for start in range(0, n, 500):
        scene = world.sample_scenes(min(500, n - start), generator)
        images = world.render(scene)
        if noise > 0:
            images = images + noise * torch.randn(images.shape, generator=generator)
        probs = judge.predict(images)
        for name, label in scene.labels().items():
            correct[name] += int((probs[name].argmax(dim=-1).cpu() == label).sum())
    return {name: count / n for name, count in correct.items()}


def _learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress))


def train_judge(
    out_dir: str | Path,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    seed: int = SEED,
    log_every: int = 50,
) -> dict:
    """Train a judge on fresh renders, write ``judge.safetensors`` and ``judge.json`` to ``out_dir``.

    Returns the config written to ``judge.json``, including the accuracy of the saved (float16)
    weights on :data:`EVAL_IMAGES` fresh images, clean and with pixel noise of sigma 0.05.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the initial weights, without touching the caller's RNG
        net = JudgeNet()
    generator = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for param in net.parameters():
        # Weight decay on norms' scales and biases only fights the normalisation.
        (no_decay if param.ndim == 1 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
    )

    start_time = time.time()
    net.train()
    for step in range(steps):
        scene = world.sample_scenes(batch_size, generator)
        images = augment(world.render(scene), generator)
        logits = net(images)
        labels = scene.labels()
        losses = {name: F.cross_entropy(logits[name], labels[name]) for name in logits}
        loss = sum(losses.values())
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            detail = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            print(f"step {step:5d}  loss {loss.item():.4f}  {detail}  {time.time() - start_time:.0f}s", flush=True)
    train_seconds = time.time() - start_time

    net.eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_file(state, out_dir / WEIGHTS_FILE)
    config = {
        "architecture": {"class": "JudgeNet", "channels": list(CHANNELS), "image_size": world.IMAGE_SIZE},
        "attributes": {name: list(values) for name, values in world.ATTRIBUTES.items()},
        "parameters": sum(p.numel() for p in net.parameters()),
        "training": {"steps": steps, "batch_size": batch_size, "seed": seed, "seconds": round(train_seconds, 1)},
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    judge = Judge.load(out_dir)
    config["accuracy"] = {
        "images": EVAL_IMAGES,
        "seed": EVAL_SEED,
        "clean": accuracy(judge, EVAL_IMAGES, EVAL_SEED),
        "noise_0.05": accuracy(judge, EVAL_IMAGES, EVAL_SEED, noise=0.05),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for judge.safetensors and judge.json")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = train_judge(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(json.dumps(config["accuracy"], indent=2))
    return config


if __name__ == "__main__":
    main()
