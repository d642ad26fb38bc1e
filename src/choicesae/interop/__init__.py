"""The on-disk formats of other libraries (SAELens, sparsify, circuit-tracer)."""
