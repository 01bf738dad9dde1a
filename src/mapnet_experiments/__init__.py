"""Experiments on top of the mapnet library: the paper's models, data, the training recipe,
reproductions, benchmarks and the `mapnet` command. The library (`mapnet`) never imports this."""
