"""The objective of one training step, over the dense reference ops or the sparse index kernels."""
