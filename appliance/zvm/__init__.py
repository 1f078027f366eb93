"""ZVM: the management server of a site (docs/zvm.md)."""
