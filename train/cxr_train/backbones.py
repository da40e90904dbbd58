"""The backbone registry: one :class:`Backbone` entry per backbone, read by model building, reload,
``cxr-train --backbone`` and the exporter's image check. Importing it does not import torch; an
entry's ``build`` does. See ``docs/training.md``.

Examples:
    >>> BACKBONES["resnet50"].feature_dim
    2048
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone's base (image -> pooled features) and what loading it needs.

    Attributes:
        name: the key in :data:`BACKBONES`; with ``imagenet``, also torchvision's model name.
        build: ``build(pretrained, init)`` -> the base module; ``init``: run its own weight init.
        feature_dim: width of the pooled features, the head's input.
        input_size: the input size its ImageNet weights were trained at.
        imagenet: torchvision publishes ImageNet weights under ``name``.
        transform_input: inception's ``transform_input`` flag: on when starting from pretrained
            weights, recorded in ``checkpoint.json`` and set back on reload.
        domain_taps: the ONNX tensor names whose channel statistics the image check reads
            (:mod:`cxr_export.domain.stages`; why: ``docs/design/domain-check.md``); empty: the
            pooled features.
        heatmap_layer: the ONNX tensor whose Grad-CAM map the exported files carry (at least 14 x 14
            at 224 px; :mod:`cxr_export.heatmap`); empty: the last feature map.
    """

    name: str
    build: Callable[[bool, bool], "nn.Module"]
    feature_dim: int
    input_size: int = 224
    imagenet: bool = True
    transform_input: bool = False
    domain_taps: Tuple[str, ...] = ()
    heatmap_layer: str = ""


def _resnet(name: str, pretrained: bool, init: bool) -> "nn.Module":
    import torchvision.models as tvm
    from torch import nn

    model = getattr(tvm, name)(weights=None)
    model.fc = nn.Identity()
    return model


def _vgg16(pretrained: bool, init: bool) -> "nn.Module":
    import torchvision.models as tvm

    from .models import VGGBase

    return VGGBase(tvm.vgg16(weights=None).features)


def _inception_v3(pretrained: bool, init: bool) -> "nn.Module":
    import torchvision.models as tvm
    from torch import nn

    # transform_input re-scales the input as Google's weights expect; init is skipped before loading
    model = tvm.inception_v3(weights=None, aux_logits=False, init_weights=init and not pretrained,
                             transform_input=pretrained)
    model.fc = nn.Identity()
    model.dropout = nn.Identity()
    return model


def _features_base(name: str, pretrained: bool, init: bool) -> "nn.Module":
    """A torchvision model's ``features`` with global average pooling (MobileNetV3, EfficientNet);
    its ImageNet ``features.*`` tensors load by name, its classifier is replaced by the head."""
    import torchvision.models as tvm

    from .models import VGGBase

    return VGGBase(getattr(tvm, name)(weights=None).features)


def _tiny(pretrained: bool, init: bool) -> "nn.Module":
    from .models import TinyBase

    return TinyBase(width=32)


BACKBONES: Dict[str, Backbone] = {spec.name: spec for spec in (
    # VGG16: the max-pools closing blocks 1 to 4 (the ends of its first four stages)
    Backbone("vgg16", _vgg16, feature_dim=512,
             domain_taps=("/features.4/MaxPool_output_0", "/features.9/MaxPool_output_0",
                          "/features.16/MaxPool_output_0", "/features.23/MaxPool_output_0"),
             heatmap_layer="/features.29/Relu_output_0"),  # the last convolution, before the last max-pool
    # ResNet50: two activations inside bottleneck blocks, layer2.3.conv1 (128 x 28 x 28) and
    # layer3.1.conv2 (256 x 14 x 14), after their ReLU
    Backbone("resnet50", partial(_resnet, "resnet50"), feature_dim=2048,
             domain_taps=("/relu_19/Relu_output_0", "/relu_26/Relu_output_0"),
             heatmap_layer="/relu_39/Relu_output_0"),  # the end of layer3 (14 x 14 at 224 px)
    # InceptionV3: the first stem max-pool, Mixed_5d and Mixed_6e
    Backbone("inception_v3", _inception_v3, feature_dim=2048, input_size=299, transform_input=True,
             domain_taps=("/maxpool1/MaxPool_output_0", "/Concat_2_output_0", "/Concat_7_output_0"),
             heatmap_layer="/Concat_2_output_0"),  # Mixed_5d (25 x 25 at 224 px)
    # Edge backbones read the ends of their first four stages, as VGG16 and InceptionV3 (112, 56, 28
    # and 14 px at 224 px input). Their heatmap is the last feature map (7 x 7 at 224 px): every
    # 14 x 14 layer lies behind HardSwish or SiLU and squeeze-excitation, which
    # cxr_export.backprop cannot carry a gradient through.
    # MobileNetV3-Large: the residual Adds closing features.1, .3, .6 and .12
    Backbone("mobilenet_v3_large", partial(_features_base, "mobilenet_v3_large"), feature_dim=960,
             domain_taps=("/Add_output_0", "/Add_1_output_0", "/Add_3_output_0", "/Add_7_output_0")),
    # EfficientNet-B0: features.1's projection (it has no residual), the Adds closing features.2 to .4
    Backbone("efficientnet_b0", partial(_features_base, "efficientnet_b0"), feature_dim=1280,
             domain_taps=("/block.2.0/Conv_output_0", "/Add_output_0", "/Add_1_output_0", "/Add_3_output_0")),
    Backbone("resnet18", partial(_resnet, "resnet18"), feature_dim=512),
    Backbone("tiny", _tiny, feature_dim=32, imagenet=False),  # four conv layers: tests and smoke runs
)}


def get_backbone(name: str) -> Backbone:
    """The registry entry of ``name``; ``ValueError`` naming the choices when there is none."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None
