"""What every judge provides, and the arithmetic their summaries share.

A judge is built once per evaluation (see :data:`trasce.eval.evaluate.JUDGES`), then called on batches:

* ``name``: the registry name (``"nudenet"``, ``"toy"``, ...);
* ``settings()``: the stated protocol as a JSON-able dict (detector and version, classes, threshold,
  weights...). Verdicts made under other settings are never mixed with new ones: a resumed evaluation
  whose settings differ is refused;
* ``judge(images, records)``: one dict per image with the judge's raw outputs and its decision
  (``flagged`` for the judges that flag images, ``correct`` / ``agrees`` for the others);
* ``summarize(verdicts)``: the numbers to report, including a ``table`` of rows for
  :func:`trasce.eval.evaluate.format_table`.

Rates come with a 95 % Wilson score interval (:func:`wilson_interval`), which stays inside [0, 1] and
is sensible at 0 or n flagged images, unlike the normal approximation. Where a prompt has several
images, which are not independent draws, the interval is taken on an effective number of images
(:func:`effective_n`, the design effect of images clustered by prompt).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "Context",
    "Judge",
    "effective_n",
    "embeddings",
    "is_correct",
    "is_flagged",
    "load_clip",
    "mean_entry",
    "rate_entry",
    "rate_over",
    "rate_row",
    "require_path",
    "resolve_device",
    "run_concept",
    "value_row",
    "wilson_interval",
]

Z_95 = 1.96  # two-sided 95 % normal quantile, as usually written


@runtime_checkable
class Judge(Protocol):
    """The interface :func:`trasce.eval.evaluate.evaluate_folder` drives."""

    name: str
    batch_size: int

    def settings(self) -> dict[str, Any]:
        """The stated protocol: everything that can change a verdict, JSON-able."""
        ...

    def judge(self, images: Sequence[Image], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One verdict per image: raw outputs plus a decision field."""
        ...

    def summarize(self, verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Numbers to report over ``verdicts`` (one per image), with a ``table`` of rows."""
        ...


@dataclass
class Context:
    """What a judge may need to know about the folder it judges.

    ``run`` is the folder's ``run.json`` (``None`` when it has none); ``concept`` is the erased concept
    as text (``run.json`` settings, else the manifest records), ``None`` when there is none.
    """

    folder: Path
    run: dict[str, Any] | None = None
    concept: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


def run_concept(run: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]] = ()) -> str | None:
    """The concept a run erased: ``run.json``'s ``settings.concept`` (or a top-level ``concept``), else
    the first manifest record's ``concept``; ``None`` when none is set or it is blank."""
    candidates: list[Any] = []
    if run:
        settings = run.get("settings")
        if isinstance(settings, Mapping):
            candidates.append(settings.get("concept"))
        candidates.append(run.get("concept"))
    candidates.extend(record.get("concept") for record in records[:1])
    for value in candidates:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def wilson_interval(k: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95 % for the default ``z``).

    ``centre = (p + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)`` with
    ``p = k/n``. With ``n = 0`` nothing is known and ``(0.0, 1.0)`` is returned.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def effective_n(clusters: Sequence[tuple[int, int]]) -> float:
    """How many independent images ``clusters`` (``(k_i, m_i)``: flagged and all images of prompt ``i``)
    are worth for a rate, as Korn and Graubard (1998) take it for a clustered sample:
    ``n / deff * (t(n-1) / t(C-1))^2``, capped at ``n``. The design effect ``deff`` is the cluster-robust
    variance of ``p = k/n``, ``C/(C-1) * sum((k_i - p m_i)^2) / n^2`` over ``C`` prompts, over the
    binomial ``p(1-p)/n``, and is taken as 1 where it is below 1 or cannot be seen (a rate of 0 or 1);
    ``t(d)`` is Student's 97.5 % quantile with ``d`` degrees of freedom, which shrinks the count where
    there are few prompts. With one image per prompt, or one prompt, the count is ``n``.
    """
    n = sum(m for _, m in clusters)
    k = sum(flagged for flagged, _ in clusters)
    count = len(clusters)
    if n == 0 or count < 2 or all(m == 1 for _, m in clusters):
        return float(n)
    from scipy.stats import t

    p = k / n
    design_effect = 1.0
    if 0 < k < n:
        robust = count / (count - 1) * math.fsum((flagged - p * m) ** 2 for flagged, m in clusters) / n**2
        design_effect = max(1.0, robust / (p * (1 - p) / n))
    degrees = (float(t.ppf(0.975, n - 1)) / float(t.ppf(0.975, count - 1))) ** 2
    return min(float(n), n / design_effect * degrees)


def rate_entry(k: int, n: int) -> dict[str, Any]:
    """``{"rate": k/n, "k": k, "n": n, "ci95": [low, high]}``; the rate is ``None`` when ``n`` is 0."""
    low, high = wilson_interval(k, n)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": [low, high]}


def is_flagged(verdict: Mapping[str, Any]) -> bool:
    """The decision of a judge that flags images, for :func:`rate_over`."""
    return bool(verdict["flagged"])


def is_correct(verdict: Mapping[str, Any]) -> bool | None:
    """The decision of a classifier judge, for :func:`rate_over` (``None``: the image has no label)."""
    return None if verdict.get("correct") is None else bool(verdict["correct"])


def rate_over(verdicts: Iterable[Mapping[str, Any]], decide: Callable[[Mapping[str, Any]], bool | None]
              ) -> dict[str, Any]:
    """:func:`rate_entry` of ``decide(verdict)`` over the verdicts where it is not ``None``, their images
    grouped into prompts by ``case`` (a verdict without one is a prompt of its own). Where a prompt has
    several images, the interval is Wilson's on :func:`effective_n` images at the same rate, and the
    entry also holds ``prompts`` and ``effective_n``."""
    clusters: dict[Any, list[int]] = {}
    for verdict in verdicts:
        decision = decide(verdict)
        if decision is None:
            continue
        case = verdict.get("case")
        counts = clusters.setdefault(object() if case is None else case, [0, 0])
        counts[0] += bool(decision)
        counts[1] += 1
    pairs = [(flagged, m) for flagged, m in clusters.values()]
    entry = rate_entry(sum(f for f, _ in pairs), sum(m for _, m in pairs))
    if all(m == 1 for _, m in pairs):  # (no verdict at all included)
        return entry
    worth = effective_n(pairs)
    entry["ci95"] = list(wilson_interval(entry["rate"] * worth, worth))
    return {**entry, "prompts": len(pairs), "effective_n": round(worth, 3)}


def mean_entry(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof=1), min, max and count of ``values``."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def rate_row(metric: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """A table row for a :func:`rate_entry` (shown as a percentage with its interval)."""
    row = {"metric": metric, "value": entry["rate"], "k": entry["k"], "n": entry["n"], "ci95": entry["ci95"],
           "unit": "%"}
    row.update((key, entry[key]) for key in ("prompts", "effective_n") if key in entry)
    return row


def value_row(metric: str, value: float | None, n: int | None = None, std: float | None = None,
              unit: str = "") -> dict[str, Any]:
    """A table row for a plain number (a mean, a distance), with an optional standard deviation."""
    return {"metric": metric, "value": value, "n": n, "std": std, "unit": unit}


def require_path(value: str | Path | None, option: str, judge: str, what: str, folder: bool = True) -> Path:
    """``value`` as a path that exists, else a ``ValueError`` saying which option to give.

    ``option`` is the command-line flag (``--clip-model``); ``what`` says what it must point to.
    """
    if value is None or str(value).strip() == "":
        raise ValueError(f"the {judge} judge needs {option} PATH ({what})")
    path = Path(value).expanduser()
    if folder and not path.is_dir():
        raise ValueError(f"{option} {path} is not a folder; the {judge} judge needs {what}")
    if not folder and not path.is_file():
        raise ValueError(f"{option} {path} is not a file; the {judge} judge needs {what}")
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks), to name a judge's weights or prompts."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str | None) -> str:
    """``"auto"`` (or ``None``) becomes ``"cuda"`` when torch sees a GPU, else ``"cpu"``; a named
    device must exist on this machine (``ValueError`` naming it otherwise)."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    from trasce.generate import pick_device

    return str(pick_device(str(device)))


def embeddings(output: Any) -> Any:
    """The projected embeddings of ``CLIPModel.get_image_features`` / ``get_text_features``: a tensor
    in transformers 4, a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is it in transformers 5."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"cannot read embeddings from a {type(output).__name__}")


def load_clip(path: str | Path | None, judge: str, device: str | None = None) -> tuple[Any, Any, Path]:
    """A local transformers ``CLIPModel`` and ``CLIPProcessor`` from ``--clip-model PATH`` (no download)."""
    folder = require_path(path, "--clip-model", judge, "a transformers CLIP folder")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--clip-model {folder} is not a transformers CLIP folder with a processor: {first}"
        ) from error
    return model.to(resolve_device(device)).eval(), processor, folder
