"""Model-family adapters, picked from the class of the user's diffusers pipeline."""

from __future__ import annotations

from trasce.models.base import Adapter
from trasce.models.flux import FluxAdapter
from trasce.models.sd import StableDiffusionAdapter
from trasce.models.sd3 import StableDiffusion3Adapter
from trasce.models.sdxl import StableDiffusionXLAdapter

ADAPTERS: list[type[Adapter]] = [StableDiffusionAdapter, StableDiffusionXLAdapter, StableDiffusion3Adapter,
                                 FluxAdapter]

#: Why some supported pipelines still cannot be steered; part of the unsupported-pipeline error.
CFG_FREE_NOTE = (
    "Models distilled to run without classifier-free guidance (FLUX.1-schnell, SDXL-Turbo, LCM at CFG 1) "
    "cannot be steered by TraSCE whatever their pipeline: it needs the unconditional and concept branches "
    "of real classifier-free guidance."
)


def adapter_class_for(pipeline_class: type) -> type[Adapter]:
    """The adapter class for ``pipeline_class``, matched by the class or the nearest base class that one accepts.

    The class hierarchy is walked from the most specific class up, so a pipeline that subclasses
    a supported one gets the subclass' own adapter when there is one, whatever ``ADAPTERS``' order.
    """
    for cls in pipeline_class.__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.pipeline_classes:
                return adapter
    supported = ", ".join(c for a in ADAPTERS for c in a.pipeline_classes)
    raise TypeError(f"{pipeline_class.__name__} is not supported; trasce supports: {supported}. {CFG_FREE_NOTE}")


def adapter_for(pipe) -> Adapter:
    """The adapter for ``pipe`` (see ``adapter_class_for``)."""
    return adapter_class_for(type(pipe))(pipe)


__all__ = ["ADAPTERS", "CFG_FREE_NOTE", "Adapter", "FluxAdapter", "StableDiffusion3Adapter", "StableDiffusionAdapter",
           "StableDiffusionXLAdapter", "adapter_class_for", "adapter_for"]
