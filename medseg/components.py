"""Connected lesions: the one connectivity rule every module labels lesions with.

Two lesion voxels belong to the same lesion when they share a face, an edge or a corner
(26-neighbour connectivity in 3D): dataset checks, plan fingerprints, patch sampling,
post-processing and lesion-wise evaluation all count the same lesions. Evaluation may ask for
6 (faces only) or 18 (faces and edges) explicitly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONNECTIVITIES", "LESION_CONNECTIVITY", "label_components", "structure"]

#: Neighbours of a voxel that join it into one lesion.
LESION_CONNECTIVITY = 26
#: Supported connectivities -> rank of scipy's structuring element (1 faces, 2 + edges, 3 + corners).
CONNECTIVITIES = {6: 1, 18: 2, 26: 3}


def structure(connectivity: int = LESION_CONNECTIVITY) -> np.ndarray:
    """The 3x3x3 boolean structuring element of ``connectivity`` (6, 18 or 26 neighbours).

    Raises:
        ValueError: for any other connectivity, naming it.
    """
    from scipy import ndimage

    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 6, 18 or 26, found {connectivity!r}")
    return ndimage.generate_binary_structure(3, CONNECTIVITIES[connectivity])


def label_components(mask, connectivity: int = LESION_CONNECTIVITY) -> tuple[np.ndarray, int]:
    """Connected components of a 3D mask.

    Args:
        mask: 3D array; nonzero voxels are lesion.
        connectivity: 6, 18 or 26 (default :data:`LESION_CONNECTIVITY`).

    Returns:
        ``(labels, n)``: int32 array of ``mask``'s shape, 0 outside lesions and ``1..n`` numbering
        the components in C (row-major) scan order of their first voxel; ``n`` components.

    Raises:
        ValueError: a bad connectivity, or ``mask`` not 3D.
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, found shape {mask.shape} ({mask.ndim}D)")
    labels, n = ndimage.label(mask, structure=structure(connectivity))
    return labels, int(n)
