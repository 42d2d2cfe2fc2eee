"""Adapter lifecycle: validation, the S3 store, the Redis registry and the vLLM resolver plugin."""
