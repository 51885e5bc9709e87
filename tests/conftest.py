"""Shared fixtures: small real GeoTIFFs written with rasterio in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import UTM, UTM_TRANSFORM


@pytest.fixture
def small_scene(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A 700×900 scene with ~60 objects; returns (image, labels, label array)."""
    from geomask.testing import make_scene, write_scene

    labels = make_scene(700, 900, 60, seed=3, max_size_px=400, n_big=1)
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, UTM)
    return image, label_path, labels
