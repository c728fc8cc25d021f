"""DeCo-SGD: adaptive compression ratio and staleness for data-parallel SGD (empty until its issue lands)."""
