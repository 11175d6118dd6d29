"""The pipeline stages, one per file, in data-flow order: source, decode, batching,
scoring, policy, verdicts, outputs, sink, offsets; ``app`` wires them."""
