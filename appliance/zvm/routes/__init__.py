"""The ZVM API views, one module per area; each has ``register(api, zvm)``."""
