"""The learning loop: features, prediction, the retrain pipeline, and the Services a process holds."""
