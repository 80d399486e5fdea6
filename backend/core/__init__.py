"""The torch-only core: backbones, image decoding, embedding, heads, training and the model store.

Nothing here imports Flask, RQ or Label Studio; the HTTP layer and the jobs are thin adapters
over it. The only outside dependency besides torch is a Redis connection passed in explicitly.
"""
