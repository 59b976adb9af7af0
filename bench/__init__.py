"""Benchmarks: programs that print a table and write JSON, each compared with a peer in the same
run (``mace bench NAME``; the command line imports a benchmark's module only when it runs it)."""
