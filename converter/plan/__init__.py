"""Planning: a mapping resolved against one source and one target, every target tensor bound to its rule."""
