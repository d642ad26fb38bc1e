"""Communication and the parallel backends of the step: data parallel and feature sharded (one
process is the identity backend, step.ops.Local)."""
