"""The data layer every stage shares: corpora (`sources`), the tokenizer (`tokenizer`) and packed,
checkpointable grain pipelines (`pipeline`). A leaf package: it imports nothing from models/,
trainers/ or serving/."""
