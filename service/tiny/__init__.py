"""Tiny checkpoints in the exact formats of the real Emu3.5 ones, made by the project for tests and the demo."""
