"""Execution engines: continuous batching (causal LM), dynamic batching (encoder), echo."""
