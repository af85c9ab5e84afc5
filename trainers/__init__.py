"""One module per stage (pretrain, sft, reward, dpo, ppo, grpo) over the shared loop in loop.py."""
