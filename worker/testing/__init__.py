"""Real stand-ins for tests, benchmarks and the demo: an embedded Kafka broker and loopback API servers."""
