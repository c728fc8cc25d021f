"""CompactFusion: residual-compressed activation exchange for parallel DiT inference (empty until its issue lands)."""
