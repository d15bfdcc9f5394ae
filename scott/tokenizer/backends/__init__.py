"""Backends computing the one masked meaning of a tokenizer stack.

Each backend module exposes ``run(layers, images, visible) -> [B, D, gh, gw]`` (masked
positions exactly zero) and ``available() -> (bool, reason)``.
"""
