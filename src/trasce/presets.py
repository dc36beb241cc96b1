"""Published TraSCE settings (SD v1.4, DDIM 50 steps, 512 px), and the embedded model's own.

The paper's settings were chosen for Stable Diffusion's 4x64x64 latents, where
``||eps_p - eps_c||`` is in the tens; the embedded 3x32x32 pixel model's distances are an order of
magnitude smaller, so its presets (``toy-*``) were found by a sweep on its validation captions
(``benchmarks/toy_sweep.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from trasce.sampler import is_number


@dataclass(frozen=True)
class Preset:
    """A concept text (``None``: the user names it, like ``example``) and the loss scale, step size and sigma."""

    concept: str | None
    loss_scale: float
    step_size: float
    sigma: float
    note: str = ""
    example: str = "Van Gogh"


PRESETS: dict[str, Preset] = {
    "nudity": Preset(
        "naked, nude, bare, exposed, Stripped, topless, male genitalia, penis, buttocks", 1.5, 1.0, 2.0,
        "TraSCE paper, nudity (I2P, Ring-A-Bell, MMA-Diffusion, P4D, UnlearnDiffAtk)",
    ),
    "violence": Preset(
        "hate, harassment, violence, suffering, humiliation, harm, suicide, blood", 1.5, 1.0, 1.0,
        "TraSCE paper, violence (I2P)",
    ),
    "style": Preset(None, 1.0, 1.0, 0.25, "TraSCE paper, artistic style: give the artist", "Van Gogh"),
    "object": Preset(None, 1.0, 1.0, 1.0, "TraSCE paper, object: give the object", "French Horn"),
    # The embedded model: shapes and fill styles play the roles of objects and styles.
    # Chosen on validation captions by benchmarks/toy_sweep.py (README "The embedded model").
    "toy-shape": Preset(None, 1.0, 1.0, 0.1, "embedded model, a shape: give it", "circle"),
    "toy-fill": Preset(None, 1.0, 1.0, 0.1, "embedded model, a fill style: give it", "striped"),
}


#: What a list of concepts for one image is told (TraSCE has one concept branch per image).
ONE_CONCEPT = (
    "TraSCE steers each image away from one concept text. Words for one concept go in one text, as the published "
    f"nudity preset's do ({PRESETS['nudity'].concept!r}); on the embedded model, one text naming two different "
    "concepts erased a shape and a fill style together but not two shapes (README, Python API)"
)


def resolve(preset: str | None, concept: str | None, loss_scale: float | None, step_size: float | None,
            sigma: float | None) -> tuple[str, float, float, float]:
    """Concept and settings from a preset, with explicit values taking precedence.

    Raises ``ValueError`` for an unknown preset, a preset that needs a concept but got none, or
    no concept at all; ``TypeError`` for a concept that is not one text (a list of concepts) or a
    setting that is not a number.
    """
    base = Preset(None, 1.0, 1.0, 1.0)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
    if concept is not None and not isinstance(concept, str):
        raise TypeError(f"concept must be one text, got {type(concept).__name__} {concept!r}: {ONE_CONCEPT}")
    concept = concept if concept is not None else base.concept
    if not concept or not concept.strip():
        hint = f"preset {preset!r} needs the concept named" if preset else "give a concept or a preset"
        raise ValueError(f"no concept to erase: {hint} (e.g. concept={base.example!r}; on the command line, "
                         f"--concept {base.example!r})")
    given = {"loss_scale": loss_scale, "step_size": step_size, "sigma": sigma}
    for name, value in given.items():
        if value is not None and not is_number(value):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return (
        concept,
        base.loss_scale if loss_scale is None else float(loss_scale),
        base.step_size if step_size is None else float(step_size),
        base.sigma if sigma is None else float(sigma),
    )
