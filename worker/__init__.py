"""moderation-worker: streaming content moderation for Kafka.

The pipeline, one stage per module: ``source`` -> ``decode`` -> ``batching`` ->
``backends`` -> ``policy`` -> ``sink``, with ``offsets`` deciding what may be committed
and ``app`` wiring them together. ``config`` is the one settings object.
"""

__version__ = "0.1.0"
