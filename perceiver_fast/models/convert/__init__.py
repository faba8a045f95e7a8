"""Converters from other Perceiver implementations' models and state dicts to ours."""
