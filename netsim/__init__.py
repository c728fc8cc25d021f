"""netsim: emulated slow, time-varying links (empty until its issue lands)."""
