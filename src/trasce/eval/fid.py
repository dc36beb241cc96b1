"""Fréchet distance between image sets, and an FID judge built on torchmetrics' Inception.

:func:`frechet_distance` and :func:`fid_from_features` are plain numpy/scipy and work on any features
(the toy judge's, for instance)::

    d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)

The ``fid`` judge needs ``torchmetrics`` (``pip install torchmetrics``; its Inception network also
needs ``torch-fidelity``), the Inception weights file (``--inception-weights PATH``, the
``weights-inception-2015-12-05-6726825d.pth`` torch-fidelity uses; nothing is downloaded) and a folder of
reference images (``--reference DIR``, e.g. the COCO images whose captions were the prompts). Each
image's 2048 pool features are stored in its verdict (float32, base64), so an interrupted evaluation
resumes; the reference features are computed each time the summary is made.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trasce.eval.base import Context, file_sha256, require_path, resolve_device, value_row

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

__all__ = ["FIDJudge", "decode_features", "encode_features", "fid_from_features", "frechet_distance"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES = "torchmetrics FrechetInceptionDistance(feature=2048).inception: InceptionV3 pool3, 2048 features"


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Means are vectors (or scalars), covariances matrices (or scalar variances, for 1-D). The matrix
    square root is ``scipy.linalg.sqrtm``; when the product is singular enough for it to fail, ``eps``
    is added to both diagonals first (as pytorch-fid does). Tiny imaginary parts from rounding are
    dropped; large ones raise ``ValueError``.
    """
    import numpy as np
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in the matrix square root")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _as_matrix(features: Any) -> np.ndarray:
    import numpy as np

    if hasattr(features, "detach"):  # torch tensors
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"features must be (N, D) or (N,), got shape {array.shape}")
    if len(array) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(array)}")
    return array


def fid_from_features(a: Any, b: Any) -> float:
    """Fréchet distance between two sets of feature vectors, ``(N, D)`` and ``(M, D)`` (``(N,)`` for 1-D).

    Means and unbiased covariances (``ddof=1``, as torchmetrics and pytorch-fid) of each set, then
    :func:`frechet_distance`. Numpy arrays or torch tensors.
    """
    import numpy as np

    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def encode_features(vector: Any) -> str:
    """A feature vector as base64 of its float32 little-endian bytes (for a JSON verdict line)."""
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_features(text: str) -> np.ndarray:
    """Inverse of :func:`encode_features`: a float64 vector."""
    import numpy as np

    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def reference_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted), by suffix."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


_reference_cache: dict[str, Any] = {}  # FIDJudge.reference_features' last set: "key" and "features"


class FIDJudge:
    """FID against ``--reference DIR`` with torchmetrics' Inception (``--inception-weights PATH``)."""

    name = "fid"
    # The reference set changes the summary, not a verdict: it is stated but not checked on resume.
    summary_only_settings = ("reference", "reference_images")

    def __init__(self, inception_weights: str | Path | None, reference: str | Path | None, batch_size: int = 32,
                 device: str | None = None) -> None:
        weights = require_path(inception_weights, "--inception-weights", self.name,
                               "the torch-fidelity Inception weights file, pt_inception-2015-12-05 .pth",
                               folder=False)
        self.reference = require_path(reference, "--reference", self.name, "a folder of reference images")
        self.reference_files = reference_images(self.reference)
        if len(self.reference_files) < 2:
            raise ValueError(
                f"--reference {self.reference} holds {len(self.reference_files)} images; FID needs 2 or more"
            )
        try:
            import torchmetrics
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as error:
            raise ValueError(
                f"the fid judge needs torchmetrics: pip install torchmetrics (and torch-fidelity for its Inception) "
                f"({error})"
            ) from error
        try:
            metric = FrechetInceptionDistance(feature=2048, normalize=False,
                                              feature_extractor_weights_path=str(weights))
        except (ModuleNotFoundError, ImportError, RuntimeError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"torchmetrics cannot build its FID Inception from {weights}: {first}") from error
        self.inception = metric.inception.to(resolve_device(device)).eval()
        self.weights = weights
        self.weights_sha256 = file_sha256(weights)
        self.torchmetrics_version = getattr(torchmetrics, "__version__", None)
        self.batch_size = batch_size

    @property
    def protocol(self) -> str:
        return (
            f"FID: {FEATURES} (torchmetrics {self.torchmetrics_version}, weights {self.weights.name} sha256 "
            f"{self.weights_sha256[:12]}), images resized to 299 by torchmetrics; reference {self.reference} "
            f"({len(self.reference_files)} images); distance trasce.eval.fid.frechet_distance (scipy sqrtm)"
        )

    def settings(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            "features": FEATURES,
            "torchmetrics": self.torchmetrics_version,
            "inception_weights": str(self.weights.resolve()),
            "inception_sha256": self.weights_sha256,
            "reference": str(self.reference.resolve()),
            "reference_images": len(self.reference_files),
        }

    def _features(self, images: Sequence[Image]) -> np.ndarray:
        import numpy as np
        import torch

        rows: list[np.ndarray] = [np.empty(0)] * len(images)
        device = next(self.inception.parameters()).device
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for indices in by_size.values():  # images of one size go through together
            batch = torch.stack([
                torch.from_numpy(np.asarray(images[i].convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
                for i in indices
            ])
            with torch.no_grad():
                out = self.inception(batch.to(device)).reshape(len(indices), -1).double().cpu().numpy()
            for row, i in enumerate(indices):
                rows[i] = out[row]
        return np.stack(rows)

    def judge(self, images: Sequence[Image], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if not images:
            return []
        features = self._features(images)
        return [{"features": encode_features(row), "dim": int(row.size)} for row in features]

    def reference_features(self) -> np.ndarray:
        """The reference images' features; made once per process for the same files and weights (a
        benchmark summarises one folder per method and prompt set against one reference set)."""
        try:
            stats = [path.stat() for path in self.reference_files]
        except OSError as error:
            raise ValueError(f"cannot read reference image {error.filename}: {error.strerror}") from error
        key = (self.weights_sha256, str(next(self.inception.parameters()).device),
               tuple((str(path), stat.st_size, stat.st_mtime_ns)
                     for path, stat in zip(self.reference_files, stats, strict=True)))
        if _reference_cache.get("key") != key:
            _reference_cache.clear()  # one set kept: 10,000 images' features are 160 MB
            _reference_cache.update(key=key, features=self._reference_features())
        return _reference_cache["features"]

    def _reference_features(self) -> np.ndarray:
        import numpy as np
        from PIL import Image as PILImage

        parts = []
        for start in range(0, len(self.reference_files), self.batch_size):
            images = []
            for path in self.reference_files[start : start + self.batch_size]:
                try:
                    with PILImage.open(path) as image:
                        images.append(image.convert("RGB"))
                except OSError as error:
                    raise ValueError(f"cannot read reference image {path}: {error}") from error
            parts.append(self._features(images))
        return np.concatenate(parts)

    def summarize(self, verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import numpy as np

        fid, why = None, f"FID needs at least 2 generated images, got {len(verdicts)}"
        if len(verdicts) >= 2:  # (a benchmark's smallest prompt set may hold one image: no FID, no failure)
            generated = np.stack([decode_features(v["features"]) for v in verdicts])
            fid, why = fid_from_features(generated, self.reference_features()), None
        return {
            "protocol": self.protocol,
            "images": len(verdicts),
            "reference": str(self.reference),
            "reference_images": len(self.reference_files),
            "fid": fid,
            **({"why_no_fid": why} if why else {}),
            "table": [value_row(f"FID vs {len(self.reference_files)} reference images", fid, len(verdicts))],
        }


def build(options: Mapping[str, Any], context: Context) -> FIDJudge:
    kwargs: dict[str, Any] = {"inception_weights": options.get("inception_weights"),
                              "reference": options.get("reference"), "device": options.get("device")}
    if options.get("batch_size"):
        kwargs["batch_size"] = int(options["batch_size"])
    return FIDJudge(**kwargs)
