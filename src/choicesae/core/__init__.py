"""The paper's pieces as pure functions: the sparsifiers (the registry), the SAE, losses,
allocation, preprocessing, the learning-rate schedule, and the configs."""
