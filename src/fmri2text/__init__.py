"""fmri2text: decode what a person saw in a video from their fMRI, as text, across subjects."""

__version__ = "0.1.0"
