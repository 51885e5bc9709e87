"""Detectors: the :class:`Detector` protocol and the torchvision Mask R-CNN implementation.

This is the only package that imports torch, and only in the modules that need it: importing
``geomask.detect`` itself (the protocol) is torch-free.
"""

from geomask.detect.base import Detector, ModelHints, TileImage, load_detector

__all__ = ["Detector", "ModelHints", "TileImage", "load_detector"]
