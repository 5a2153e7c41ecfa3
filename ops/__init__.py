"""looprl.ops: the `looprl` command line, config, logging, metrics, scheduler and loop supervision."""
