"""Inference over the trained model's KV-cache path: sampling, the engine, offline generation and
servers. Imports models/ (and data/ for tokenizers), never trainers/."""
