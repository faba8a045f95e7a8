"""Saving and loading Perceiver IO task models, whose config nests an encoder and a decoder config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from perceiver_fast.models.core.config import PerceiverIOConfig
from perceiver_fast.models.core.loading import build_config
from perceiver_fast.models.core.pretrained import PretrainedMixin


def sub_config_from_dict(config_class: type, values: Mapping[str, Any]) -> Any:
    """Build the dataclass ``config_class`` from its JSON form, missing fields taking their defaults.

    JSON has no tuples: a list becomes a tuple where the field is a tuple (e.g. ``image_shape``), as models compare
    shapes with tuples. Unknown fields and values of the wrong type raise ``ValueError`` naming them (see
    :func:`perceiver_fast.models.core.loading.build_config`).
    """
    return build_config(config_class, values, config_class.__name__)


class PerceiverIOPretrainedMixin(PretrainedMixin):
    """:class:`PretrainedMixin` for models configured by ``PerceiverIOConfig[encoder_config_class,
    decoder_config_class]``: ``from_pretrained`` rebuilds the nested configs with their own classes."""

    encoder_config_class: ClassVar[type]
    decoder_config_class: ClassVar[type]

    @classmethod
    def config_from_dict(
        cls, values: Mapping[str, Any], source: str = "config", every_field: bool = False
    ) -> PerceiverIOConfig:
        """Like :meth:`PretrainedMixin.config_from_dict`; ``encoder`` and ``decoder`` are checked against
        ``encoder_config_class`` and ``decoder_config_class`` (errors name fields as ``encoder.image_shape``)."""
        nested = {"encoder": cls.encoder_config_class, "decoder": cls.decoder_config_class}
        return build_config(PerceiverIOConfig, values, source, every_field=every_field, nested=nested)
