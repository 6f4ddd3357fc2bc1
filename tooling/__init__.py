"""Developer tooling: the demo, the retrieval-quality eval and the Kafka helpers that they, the
benchmarks and the tests share. Not shipped in the product wheel or image: it runs from a
checkout (``sparse-ingest demo`` and ``sparse-ingest eval`` appear when it is importable).
"""
