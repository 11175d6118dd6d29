"""Runtime plumbing around the pipeline: metrics, health probes, lag, logging; and ``dsa_submit``,
the consumer posting statements of reasons to the DSA Transparency Database."""
