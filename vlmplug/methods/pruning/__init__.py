"""Token pruning and merging methods."""
