"""fmri2text: decode what a person saw in a video from their fMRI, as text, across subjects.

``from fmri2text import Decoder`` gives the Python API (:mod:`fmri2text.api`); it is imported
on first use, so ``import fmri2text`` stays cheap (no torch, no transformers).
"""

from fmri2text import machine as _machine

_machine.pin_kernels()  # before anything loads torch or numpy (FMRI2TEXT_CPU_KERNELS)

__version__ = "0.1.0"
__all__ = ["Decoder", "export_run_model", "__version__"]


def __getattr__(name: str):
    if name == "Decoder":
        from fmri2text.api import Decoder

        return Decoder
    if name == "export_run_model":
        from fmri2text.export import export_run_model

        return export_run_model
    raise AttributeError(f"module 'fmri2text' has no attribute {name!r}")
