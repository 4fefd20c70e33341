"""What the label values mean: named classes, or nested regions, of a dataset.

The nnU-Net / Medical Segmentation Decathlon convention, from ``dataset.json`` ``"labels"`` or
``--labels-map name=ids`` on the commands:

- classes (softmax): ``{"background": 0, "liver": 5, "spleen": 1}``: each name owns one or more
  label ids, no id belongs to two classes; class index ``k`` (1-based, background 0) is the
  ``k``-th name;
- regions (sigmoid, nested): ``{"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}``
  with ``"regions_class_order": [1, 2, 3]``: a region is the union of its ids, regions may
  overlap; a prediction writes, for each region in order, its id from ``regions_class_order``
  where the region is predicted, later regions overwriting earlier ones (nnU-Net's rule).

Binary lesion segmentation (every nonzero value is the lesion) is :meth:`ClassSpec.binary`, the
zero-configuration case. One named class (``--labels-map liver=5``, or a ``dataset.json`` with one
foreground label) is binary too (:data:`BINARY`: softmax over background + the class, exactly as
``--map-labels 5:1,*:0`` trains) but keeps its name and ids: its voxels are those of its ids,
every other id is background, and a prediction writes its first id (5); the default binary spec
writes 1.

Example:
    >>> spec = ClassSpec.parse(["liver=5", "spleen=1"])
    >>> spec.names, spec.ids
    (('liver', 'spleen'), ((5,), (1,)))
    >>> spec.class_indices(np.array([0, 5, 1, 7]))
    array([0, 1, 2, 0], dtype=uint8)
"""

from medseg.io.classes.kinds import BINARY, BITS, CLASSES, IGNORE_INDEX, LABEL_KINDS, LabelKind, without_ignore
from medseg.io.classes.spec import ANY_NONZERO, ClassSpec, _ids_by_segment_name  # noqa: F401

__all__ = ["ClassSpec", "ANY_NONZERO", "LabelKind", "BINARY", "CLASSES", "BITS", "LABEL_KINDS", "IGNORE_INDEX",
           "without_ignore"]
