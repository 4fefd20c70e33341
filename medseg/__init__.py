"""medseg: lesion segmentation in 3D medical images with Keras 3."""

__version__ = "0.1.0"
