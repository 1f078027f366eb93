"""Tidemark appliances: the ZVM (management), the VRA (replication, with the DSS journal), the VBA, the ZCA."""
__version__ = "0.1.0"
