"""adapterkit benchmarks: `python -m benchmarks.run --suite smoke|quick|full`."""
