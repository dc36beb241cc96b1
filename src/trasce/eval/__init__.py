"""Judging the images of a ``trasce generate`` folder: ``trasce evaluate DIR --judge NAME``.

Each judge reads images and their manifest records and returns one verdict per image (its raw outputs
and a decision); :func:`trasce.eval.evaluate.evaluate_folder` writes the verdicts as they come, so an
evaluation can be stopped and resumed, and a summary with the judge's stated protocol.

Nothing heavy is imported here: the judges load their models only when they are built.
"""

from __future__ import annotations

from trasce.eval.base import Judge, wilson_interval

__all__ = ["Judge", "wilson_interval"]
