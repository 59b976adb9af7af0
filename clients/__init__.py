"""Async SDK, load generator and benchmarks that talk to the server over HTTP (issues 3 and 7)."""
