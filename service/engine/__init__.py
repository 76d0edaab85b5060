"""The generation engine layer: Emu3.5 decoding rules, the reference engine and the vLLM engine."""
