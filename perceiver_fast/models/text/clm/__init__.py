from perceiver_fast.models.text.clm.backend import CausalLanguageModel, CausalLanguageModelConfig

__all__ = ["CausalLanguageModel", "CausalLanguageModelConfig"]
