"""The documents surface: a tenant's retrieval corpus (``/v1/documents*``) and ``/v1/retrieve``."""
