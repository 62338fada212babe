"""The tiered expert store: disk ▸ host ▸ device slots, a replacement policy, tracing and prefetching."""
