"""The VRA: replication appliance, one per hypervisor host (protected and recovery side)."""
