"""Evaluation: benchmarks, jailbreak wrappers, judges applied to generations, metrics and suites."""
