"""CUDA graphs for decode steps: capture sizes, padding, capture and replay."""
