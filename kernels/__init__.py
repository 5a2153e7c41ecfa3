"""looprl.kernels: fused MoE-LoRA experts and chunked log-prob/entropy (torch reference + Triton)."""
