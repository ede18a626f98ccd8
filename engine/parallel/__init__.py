"""Tensor parallelism: which share of a model each rank holds, and the collectives it runs."""
