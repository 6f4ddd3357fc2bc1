"""``sparse-ingest eval``: retrieval quality on a BEIR dataset, measured through the real pipeline.

For each variant (model file x long-text mode x index-time pruning):

1. the corpus is produced to a fresh Kafka topic, the :class:`~service.app.Service` runs
   in-process on it until Kafka says the group has committed every record, and the index is
   refreshed, flushed and force-merged to one segment (so store sizes compare);
2. every test query runs against that index as BM25, sparse and hybrid (RRF), the sparse ones
   both as :class:`~service.search.Searcher` sends them (Elasticsearch's default query-time
   token pruning of the ``sparse_vector`` field applies) and exactly (``"prune": false``);
3. nDCG@10, recall@100 and MRR@10 (``tooling.eval.metrics``);
4. the scores Elasticsearch returns are checked against a brute-force dot product of the query
   vector with the document vectors the pipeline's encoder produced (captured in-process),
   with and without emulating Lucene's 9-significant-bit weight encoding.

BEIR_DIR is a BEIR folder, or the name of a BEIR dataset (``scifact``, ``nfcorpus``, ...):
its zip is then downloaded once from BEIR's public site, checked against BEIR's published md5
and unpacked into the cache ($SPARSE_INGEST_CACHE or ~/.cache/sparse-ingest, eval/<name>).

Writes ``eval_<dataset>.json`` and ``.md`` (and a ``.png`` when matplotlib is installed) into
``--out``. Starts its own local stack unless ``--kafka`` and ``--es-url`` are given.
"""
