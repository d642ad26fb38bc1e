"""The paper's comparisons, end to end, and their plots."""
