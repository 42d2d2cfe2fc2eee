"""Retrieval over each tenant's own documents (Redis search: vectors + BM25 + recency)."""
