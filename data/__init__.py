"""The data layer every stage shares: corpora (`sources`), tokenizers (`tokenizer`, and
`hf_tokenizer` for imported checkpoints), packed checkpointable grain pipelines (`pipeline`), the
chat template and its loss mask (`chat`) and the SFT sets (`sft_sources`). A leaf package: it
imports nothing from models/, trainers/ or serving/."""
