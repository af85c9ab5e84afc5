"""ml_collections configs: one file per stage, presets chosen by `:arg` (big_vision style)."""
