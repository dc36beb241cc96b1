"""The embedded model's world: one coloured shape, drawn in a fill style, on a plain background.

Every image is a pure function of its attributes (shape, colour, fill, background, position, size),
and the attributes are a pure function of a seed, so the same seed gives the same image on any
device. Rendering is vectorised in torch: a batch of 4,096 images takes milliseconds on a GPU,
which lets training draw a fresh world for every step instead of reading a data set.

Images are drawn at ``SUPERSAMPLE`` times the output size and box-filtered down, which anti-aliases
edges the way a camera would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
FILLS = ("solid", "striped", "outlined")
BACKGROUNDS = ("black", "white", "gray")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "fill": FILLS,
    "background": BACKGROUNDS,
}

RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 205),
    "orange": (250, 135, 25),
    "black": (20, 20, 20),
    "white": (238, 238, 238),
    "gray": (125, 125, 125),
}

STRIPE_PERIOD = 6  # output pixels: 4 painted, 2 bare; finer stripes alias away at 32 px
STRIPE_ON = 4
OUTLINE_WIDTH = 2  # output pixels


@dataclass(frozen=True)
class Scene:
    """Attributes of a batch of images; each field is a tensor of shape ``(B,)``.

    ``shape``/``color``/``fill``/``background`` index the tuples above; ``cx``/``cy`` are the centre
    and ``radius`` the half-size, all in output pixels.
    """

    shape: torch.Tensor
    color: torch.Tensor
    fill: torch.Tensor
    background: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)

    def labels(self) -> dict[str, torch.Tensor]:
        """The four class labels, keyed like :data:`ATTRIBUTES`."""
        return {"shape": self.shape, "color": self.color, "fill": self.fill, "background": self.background}


def sample_scenes(n: int, generator: torch.Generator, fixed: dict[str, int] | None = None) -> Scene:
    """Draw ``n`` scenes uniformly; ``fixed`` pins attributes, e.g. ``{"shape": 0}`` for circles.

    Draws on the CPU from ``generator`` so that a seed means the same scenes everywhere.
    """
    fixed = fixed or {}

    def pick(name: str) -> torch.Tensor:
        if name in fixed:
            return torch.full((n,), int(fixed[name]), dtype=torch.long)
        return torch.randint(len(ATTRIBUTES[name]), (n,), generator=generator)

    labels = {name: pick(name) for name in ATTRIBUTES}
    jitter = torch.rand(3, n, generator=generator)
    return Scene(
        **labels,
        cx=IMAGE_SIZE / 2 + (jitter[0] - 0.5) * 6,
        cy=IMAGE_SIZE / 2 + (jitter[1] - 0.5) * 6,
        radius=9.0 + jitter[2] * 3.0,
    )


def _star_polygon() -> torch.Tensor:
    """Unit five-pointed star as 10 vertices (outer radius 1, inner 0.45), point up."""
    angles = torch.arange(10, dtype=torch.float64) * math.pi / 5 - math.pi / 2
    radii = torch.tensor([1.0, 0.45] * 5, dtype=torch.float64)
    return torch.stack([radii * angles.cos(), radii * angles.sin()], dim=1).float()


def _inside_polygon(px: torch.Tensor, py: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Even-odd rule for points ``(px, py)`` (any shape) against a closed polygon ``(V, 2)``."""
    inside = torch.zeros_like(px, dtype=torch.bool)
    x1, y1 = vertices[:, 0], vertices[:, 1]
    x2, y2 = vertices.roll(-1, 0)[:, 0], vertices.roll(-1, 0)[:, 1]
    for a, b, c, d in zip(x1.tolist(), y1.tolist(), x2.tolist(), y2.tolist(), strict=True):
        crosses = (b > py) != (d > py)
        x_at = a + (py - b) * (c - a) / (d - b if d != b else 1e-9)
        inside ^= crosses & (px < x_at)
    return inside


def shape_masks(scene: Scene, size: int = IMAGE_SIZE, device: torch.device | str = "cpu") -> torch.Tensor:
    """Filled silhouettes at ``size * SUPERSAMPLE`` resolution, ``(B, S, S)`` bool."""
    hi = size * SUPERSAMPLE
    coords = (torch.arange(hi, device=device, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    scale = size / IMAGE_SIZE
    cx = (scene.cx.to(device) * scale)[:, None, None]
    cy = (scene.cy.to(device) * scale)[:, None, None]
    r = (scene.radius.to(device) * scale)[:, None, None]
    # Normalised coordinates: the shape's bounding circle is the unit disc.
    u = (coords[None, None, :] - cx) / r
    v = (coords[None, :, None] - cy) / r
    u, v = torch.broadcast_tensors(u, v)

    masks = torch.zeros(len(scene), hi, hi, dtype=torch.bool, device=device)
    kind = scene.shape.to(device)[:, None, None]
    circle = u**2 + v**2 <= 0.92**2
    square = (u.abs() <= 0.78) & (v.abs() <= 0.78)
    triangle = (v <= 0.62) & (u.abs() <= 0.95 * (v + 1.0) / 1.62)
    star = _inside_polygon(u * 0.95, v * 0.95 - 0.05, _star_polygon().to(device))
    cross = ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    for index, mask in enumerate((circle, square, triangle, star, cross)):
        masks |= (kind == index) & mask
    return masks


def render(scene: Scene, size: int = IMAGE_SIZE, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images of ``scene`` as ``(B, 3, size, size)`` float in ``[-1, 1]`` (diffusers' convention)."""
    silhouette = shape_masks(scene, size, device).float()[:, None]
    k = SUPERSAMPLE * size // IMAGE_SIZE  # supersampled pixels per output pixel at 32 px
    # Erosion by max-pooling the complement gives an outline of constant width in pixels.
    width = OUTLINE_WIDTH * k
    # A square structuring element is separable: two 1-D pools read 2(2w+1) pixels, not (2w+1)^2.
    outside = F.max_pool2d(1 - silhouette, (1, 2 * width + 1), stride=1, padding=(0, width))
    eroded = 1 - F.max_pool2d(outside, (2 * width + 1, 1), stride=1, padding=(width, 0))
    outline = silhouette - eroded
    rows = torch.arange(silhouette.shape[-1], device=device)[:, None].expand(-1, silhouette.shape[-1])
    stripes = ((rows % (STRIPE_PERIOD * k)) < STRIPE_ON * k).float()[None, None]

    fill = scene.fill.to(device)[:, None, None, None]
    paint = torch.where(fill == 0, silhouette, torch.where(fill == 1, silhouette * stripes, outline))
    paint = F.avg_pool2d(paint, SUPERSAMPLE)

    palette_fg = torch.tensor([RGB[c] for c in COLORS], dtype=torch.float32, device=device) / 127.5 - 1
    palette_bg = torch.tensor([RGB[c] for c in BACKGROUNDS], dtype=torch.float32, device=device) / 127.5 - 1
    fg = palette_fg[scene.color.to(device)][:, :, None, None]
    bg = palette_bg[scene.background.to(device)][:, :, None, None]
    return bg + (fg - bg) * paint


def to_pil(images: torch.Tensor) -> list:
    """``(B, 3, H, W)`` in ``[-1, 1]`` to a list of PIL images."""
    from PIL import Image

    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
