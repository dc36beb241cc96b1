"""trasce: training-free concept erasure for diffusers text-to-image models (TraSCE, arXiv 2412.07658)."""

from trasce.pipeline import TraSCEOutput, TraSCEPipeline
from trasce.presets import PRESETS
from trasce.sampler import EraseSettings, sample

__version__ = "0.1.0"
__all__ = ["PRESETS", "EraseSettings", "TraSCEOutput", "TraSCEPipeline", "__version__", "sample"]
