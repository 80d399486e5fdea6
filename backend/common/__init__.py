"""Shared plumbing: settings, errors, Redis keys and connections, queues, metrics. Imports no other part."""
