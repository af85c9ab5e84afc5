"""Benchmarks: each prints our figure and its peer\x27s, side by side, and names the device."""
