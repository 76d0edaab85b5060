"""Emu3.5 inference service: tokenizer, token protocol, prompts, IBQ vision tokenizer, record, engine, HTTP."""

__version__ = "0.1.0"
