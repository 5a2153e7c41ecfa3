"""looprl's ground floor: config, structured logging, metrics helpers, locks, retries, signals
and the adapter ``Version`` type. Every stage may import it; it imports nothing else of looprl."""
