"""headstart's ML backend, by what each package talks to (each package's README says what it may not import):

common (settings, errors, Redis keys, queues, metrics) < core (torch only) and labelstudio (the
Label Studio adapters) < loop (features, prediction, the retrain pipeline, Services) < admin and
server (HTTP); cli is the edge that starts the backend and the workers.
"""
