"""Mask post-processing shared by every Mask R-CNN back-end (torch and ONNX Runtime), in numpy only.

Both detectors end with the same step: masks pasted at tile size become :class:`Instance` objects,
cropped to the box of their pixels and placed in global working-grid pixels. Doing it in one function
means the two back-ends cannot drift apart in how a mask is thresholded, cropped or labelled, and the
ONNX path stays torch-free.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from geomask.instances import Instance


def instances_from_masks(
    masks: npt.NDArray[np.floating] | npt.NDArray[np.bool_],
    scores: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer],
    mask_threshold: float,
    row_off: int,
    col_off: int,
) -> list[Instance]:
    """Threshold pasted masks, crop each to its pixels' box and return the instances in global pixels.

    Args:
        masks: ``(n, h, w)`` mask probabilities over the tile's valid extent (padding already cut off),
            or booleans already thresholded with ``>= mask_threshold`` (the torch detector thresholds on
            the GPU so that one byte per pixel, not four, crosses to the host).
        scores: ``(n,)`` detection scores.
        labels: ``(n,)`` torchvision labels, 1-based (0 is background); ``class_id`` is ``label - 1``.
        mask_threshold: Probability at which a pixel is in the mask (``>=``, as torchvision does).
        row_off: Global row of the tile's top-left pixel.
        col_off: Global column of the tile's top-left pixel.

    Returns:
        One instance per detection whose mask has at least one pixel, in the input's order.
    """
    binary: npt.NDArray[np.bool_] = np.asarray(masks if masks.dtype == np.bool_ else masks >= mask_threshold, dtype=bool)
    if binary.shape[0] == 0:
        return []
    h, w = binary.shape[1:]
    rows_any: npt.NDArray[np.bool_] = np.any(binary, axis=2)
    cols_any: npt.NDArray[np.bool_] = np.any(binary, axis=1)
    r0 = rows_any.argmax(axis=1)
    r1 = h - rows_any[:, ::-1].argmax(axis=1)
    c0 = cols_any.argmax(axis=1)
    c1 = w - cols_any[:, ::-1].argmax(axis=1)
    found = []
    for i in np.flatnonzero(np.any(rows_any, axis=1)):
        crop = np.ascontiguousarray(binary[i, r0[i] : r1[i], c0[i] : c1[i]])
        found.append(Instance(row_off + int(r0[i]), col_off + int(c0[i]), crop, float(scores[i]), int(labels[i]) - 1))
    return found
