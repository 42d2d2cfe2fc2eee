"""The admin surface: tenants, keys, adapters and usage."""
