"""Speed benchmarks. Every figure is a ratio to a baseline timed in the same run (shared machines are noisy),
and every result file records the environment and the command that made it."""
