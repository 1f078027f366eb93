"""Recovery operations of the recovery site's ZVM (persisted state machines, ``tasks.py``),
built on the primitives of ``recovery.py`` and reached through ``forward.py``:
``failovertest.py`` (FailoverTest, FailoverTestStop), ``clone.py`` (CloneStart); Failover, Move,
Restore live in modules of their own, and ``source.py`` is the protected site's part of them."""
