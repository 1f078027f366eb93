"""The ZVM: the per-site management server (REST API, store, hypervisor adapters)."""
