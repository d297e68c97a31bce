"""commcomp."""
