"""HTTP routes, the `mace` CLI and benchmarks."""
