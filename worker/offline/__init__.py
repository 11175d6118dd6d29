"""Offline tools: training, evaluation, labelled data, the demo and the benchmarks.

Nothing in the service path (``modworker run``) imports this package."""
