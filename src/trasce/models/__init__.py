"""Model-family adapters, picked from the class of the user's diffusers pipeline."""

from __future__ import annotations

from trasce.models.base import Adapter
from trasce.models.sd import StableDiffusionAdapter

ADAPTERS: list[type[Adapter]] = [StableDiffusionAdapter]


def adapter_for(pipe) -> Adapter:
    """The adapter for ``pipe``, matched by its class or a base class' name."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for adapter in ADAPTERS:
        if any(name in adapter.pipeline_classes for name in names):
            return adapter(pipe)
    supported = ", ".join(c for a in ADAPTERS for c in a.pipeline_classes)
    raise TypeError(f"{type(pipe).__name__} is not supported; trasce supports: {supported}")


__all__ = ["ADAPTERS", "Adapter", "StableDiffusionAdapter", "adapter_for"]
