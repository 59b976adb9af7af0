"""Model execution: loading, the paged attention, the runner, sampling, the worker thread."""
