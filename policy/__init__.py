"""looprl.policy: the MoE base model, and LoRA-PPO on it scheduled with Ray, plus the offline gate."""
