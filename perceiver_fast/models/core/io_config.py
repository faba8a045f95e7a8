"""Saving and loading Perceiver IO task models, whose config nests an encoder and a decoder config."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from perceiver_fast.models.core.config import PerceiverIOConfig
from perceiver_fast.models.core.pretrained import PretrainedMixin


def sub_config_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """Build the dataclass ``config_class`` from its JSON form.

    JSON has no tuples, so a list is turned back into a tuple where the field's default is a tuple (e.g.
    ``image_shape``): models compare shapes with tuples. Unknown keys raise ``ValueError`` naming them.
    """
    known = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} fields: {unknown}")
    converted = {}
    for name, value in values.items():
        if isinstance(value, list) and isinstance(known[name].default, tuple):
            value = tuple(value)
        converted[name] = value
    return config_class(**converted)


class PerceiverIOPretrainedMixin(PretrainedMixin):
    """:class:`PretrainedMixin` for models configured by ``PerceiverIOConfig[encoder_config_class,
    decoder_config_class]``: ``from_pretrained`` rebuilds the nested configs with their own classes."""

    encoder_config_class: ClassVar[type]
    decoder_config_class: ClassVar[type]

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> PerceiverIOConfig:
        values = dict(values)
        try:
            encoder, decoder = values.pop("encoder"), values.pop("decoder")
        except KeyError as e:
            raise ValueError(f"a Perceiver IO config needs 'encoder' and 'decoder' entries, missing {e}") from None
        return PerceiverIOConfig(
            encoder=sub_config_from_dict(cls.encoder_config_class, encoder),
            decoder=sub_config_from_dict(cls.decoder_config_class, decoder),
            **values,
        )
