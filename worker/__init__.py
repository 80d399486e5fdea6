"""headstart's RQ side: the jobs (train, re-predict, embed), training coalescing and the worker process.

Jobs are plain importable functions that take ids and plain data (JSON-serialized by RQ).
Nothing here imports Flask.
"""
