"""`dlserve bench`: measurements that write BENCHMARKS.md and a JSON file of the numbers."""
