"""headstart's RQ side: the jobs (train, re-predict, embed) and the worker process that runs them.

Jobs are plain importable functions that take the worker's `Services` and plain data (JSON-serialized
by RQ). Nothing here imports Flask; nothing in `backend` imports this package.
"""
