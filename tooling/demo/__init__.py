"""``sparse-ingest demo``: the whole job on one machine, from nothing, in a few minutes.

1. Starts a local Kafka and Elasticsearch (``deploy.local``) and fetches the default model.
2. Runs the ingest service (in this process) on a fresh topic and index.
3. Produces a real stream: paragraphs of the Python standard library's docstrings, plus a
   few malformed records; then updates, metadata-only updates and deletes some documents.
4. Shows progress while it runs, checks the index ended in the right state, runs semantic
   searches (one whose best hit shares no word with the query), prints a metrics summary.
5. Stops what it started (``--keep`` leaves the stack and the service's HTTP port up until
   Ctrl-C, for poking at /metrics and /search).
"""
