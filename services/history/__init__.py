"""History: per-scope conversation history, the merge consumer, undo and erasure."""
