"""Recipes: one thin LightningCLI entry point per stage (pretrain, sft, reward, dpo, rl) + configs/*.yaml."""
