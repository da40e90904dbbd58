"""The backbone registry: one entry per backbone, read by everything that needs to know one.

:func:`cxr_train.models.build_model`, the ImageNet weights lookup, ``cxr-train --backbone``'s
choices, :func:`cxr_train.checkpoint.load_checkpoint` and the exporter's image check (which
activations it reads) all read :data:`BACKBONES`; adding a backbone is one :class:`Backbone`
entry here (and its tests).

Importing this module does not import torch (``cxr-train --help`` lists the names from it); an
entry's ``build`` imports torch and torchvision when it is called.

Examples:
    >>> BACKBONES["resnet50"].feature_dim
    2048
    >>> [name for name, spec in BACKBONES.items() if spec.imagenet]
    ['vgg16', 'resnet50', 'inception_v3', 'resnet18']
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
        build: ``build(pretrained, init)`` -> the base module. ``pretrained``: starting weights
            will be loaded into it; ``init``: run the module's own weight init (skipped when
            weights are loaded next).
        feature_dim: width of the pooled features, the head's input.
        input_size: the input size its ImageNet weights were trained at (training uses ``--image-size``).
        imagenet: torchvision publishes ImageNet weights under ``name``.
        transform_input: the base has inception's ``transform_input`` flag: on when it starts
            from pretrained weights, recorded in ``checkpoint.json`` and set back on reload.
        domain_taps: the activations (tensor names in the exported ONNX graph) whose channel means
            and standard deviations the image check reads, one test each
            (:mod:`cxr_export.domain.stages`); empty: the check reads the pooled features instead.
            Why these: ``docs/design/domain-check.md``.
    """

    name: str
    build: Callable[[bool, bool], "nn.Module"]
    feature_dim: int
    input_size: int = 224
    imagenet: bool = True
    transform_input: bool = False
    domain_taps: Tuple[str, ...] = ()


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

    # transform_input re-scales ImageNet-normalised input the way Google's weights expect;
    # its own init (about 6 s) is skipped when weights are loaded next.
    model = tvm.inception_v3(weights=None, aux_logits=False, init_weights=init and not pretrained,
                             transform_input=pretrained)
    model.fc = nn.Identity()
    model.dropout = nn.Identity()
    return model


def _tiny(pretrained: bool, init: bool) -> "nn.Module":
    from .models import TinyBase

    return TinyBase(width=32)


BACKBONES: Dict[str, Backbone] = {spec.name: spec for spec in (
    # VGG16: the max-pools closing blocks 1 to 4 (the ends of its first four stages)
    Backbone("vgg16", _vgg16, feature_dim=512,
             domain_taps=("/features.4/MaxPool_output_0", "/features.9/MaxPool_output_0",
                          "/features.16/MaxPool_output_0", "/features.23/MaxPool_output_0")),
    # ResNet50: two activations inside bottleneck blocks, layer2.3.conv1 (128 x 28 x 28) and
    # layer3.1.conv2 (256 x 14 x 14), after their ReLU
    Backbone("resnet50", partial(_resnet, "resnet50"), feature_dim=2048,
             domain_taps=("/relu_19/Relu_output_0", "/relu_26/Relu_output_0")),
    # InceptionV3: the first stem max-pool, Mixed_5d and Mixed_6e
    Backbone("inception_v3", _inception_v3, feature_dim=2048, input_size=299, transform_input=True,
             domain_taps=("/maxpool1/MaxPool_output_0", "/Concat_2_output_0", "/Concat_7_output_0")),
    Backbone("resnet18", partial(_resnet, "resnet18"), feature_dim=512),
    Backbone("tiny", _tiny, feature_dim=32, imagenet=False),  # four conv layers: tests and smoke runs
)}

#: The registered names in registry order (what ``cxr-train --backbone`` accepts).
BACKBONE_NAMES: Tuple[str, ...] = tuple(BACKBONES)


def get_backbone(name: str) -> Backbone:
    """The registry entry of ``name``; ``ValueError`` naming the choices when there is none.

    Examples:
        >>> get_backbone("inception_v3").transform_input
        True
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None
