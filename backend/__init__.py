"""headstart's ML backend: the Label Studio HTTP contract, prediction and the admin API.

`backend.core` is the torch-only core (backbones, embedding, heads, training, the model store).
"""
