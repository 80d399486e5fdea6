"""The torch-only core: encoders, image decoding, the embedding cache, heads, fitting, the guard and the store.

Nothing here imports Flask, RQ or Label Studio; the HTTP layer and the jobs are thin adapters
over it. The only outside dependency besides torch is a Redis connection passed in explicitly.
"""
