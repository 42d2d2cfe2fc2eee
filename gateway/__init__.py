"""Banyan's gateway: the HTTP surface and the request path."""
