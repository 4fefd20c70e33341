"""Key names and conventions shared by every stage."""

IMAGE = "image"
LABEL = "label"
#: World convention of :class:`medseg.io.Volume` affines (nibabel's).
WORLD = "RAS+"
#: Class indices: 0 background, 1 lesion.
BACKGROUND, LESION = 0, 1
