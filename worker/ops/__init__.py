"""Runtime plumbing around the pipeline: metrics, health probes, lag, logging."""
