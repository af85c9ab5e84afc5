"""Flax NNX model code and its sharding rules. Imports nothing from the other packages."""
