"""Training: recipes of stages (alignment, instruction, VQA, GRPO) on TRL/PEFT, configured through accelerate."""
