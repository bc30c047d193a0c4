"""Network-namespace lab for tests, benchmarks and the demo (never imported by product code)."""
