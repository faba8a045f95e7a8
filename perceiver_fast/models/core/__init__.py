"""Core Perceiver building blocks with perceiver-io 0.11.0's names: ``perceiver.model.core`` -> here."""

from perceiver_fast.models.core.adapter import (
    ClassificationOutputAdapter,
    InputAdapter,
    OutputAdapter,
    QueryProvider,
    RotarySupport,
    TiedTokenOutputAdapter,
    TokenInputAdapter,
    TokenInputAdapterWithRotarySupport,
    TrainableQueryProvider,
)
from perceiver_fast.models.core.attention import (
    MLP,
    CrossAttention,
    CrossAttentionLayer,
    MultiHeadAttention,
    SelfAttention,
    SelfAttentionBlock,
    SelfAttentionLayer,
)
from perceiver_fast.models.core.config import (
    CausalSequenceModelConfig,
    ClassificationDecoderConfig,
    DecoderConfig,
    EncoderConfig,
    PerceiverARConfig,
    PerceiverIOConfig,
)
from perceiver_fast.models.core.io_config import PerceiverIOPretrainedMixin
from perceiver_fast.models.core.perceiver_ar import CausalSequenceModel, PerceiverAR, PerceiverAROutput
from perceiver_fast.models.core.perceiver_io import PerceiverDecoder, PerceiverEncoder, PerceiverIO
from perceiver_fast.models.core.position import (
    FourierPositionEncoding,
    FrequencyPositionEncoding,
    RotaryPositionEmbedding,
    positions,
)
from perceiver_fast.models.core.utils import Residual, freeze, init_parameters

__all__ = [
    "MLP",
    "CausalSequenceModel",
    "CausalSequenceModelConfig",
    "ClassificationDecoderConfig",
    "ClassificationOutputAdapter",
    "CrossAttention",
    "CrossAttentionLayer",
    "DecoderConfig",
    "EncoderConfig",
    "FourierPositionEncoding",
    "FrequencyPositionEncoding",
    "InputAdapter",
    "MultiHeadAttention",
    "OutputAdapter",
    "PerceiverAR",
    "PerceiverARConfig",
    "PerceiverAROutput",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "PerceiverIOConfig",
    "PerceiverIOPretrainedMixin",
    "QueryProvider",
    "Residual",
    "RotaryPositionEmbedding",
    "RotarySupport",
    "SelfAttention",
    "SelfAttentionBlock",
    "SelfAttentionLayer",
    "TiedTokenOutputAdapter",
    "TokenInputAdapter",
    "TokenInputAdapterWithRotarySupport",
    "TrainableQueryProvider",
    "freeze",
    "init_parameters",
    "positions",
]
