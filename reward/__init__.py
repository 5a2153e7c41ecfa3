"""looprl.reward: the incremental reward-model updater (test-then-train, replay, gated publish)."""
