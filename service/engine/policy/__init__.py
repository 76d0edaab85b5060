"""Emu3.5's decoding policy as pure code: the rules (batched tensor ops), how a pair travels through vLLM,
and which waiting pairs may start. No vLLM import: the front end, vLLM's own processes and the reference
engine all use it."""
