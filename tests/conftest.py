import pytest

from choicesae.data.synthetic import SyntheticConfig, sparse_dictionary


@pytest.fixture(scope="session")
def synthetic():
    """32-wide activations from 128 true features, about 5 active per token."""
    x, dictionary = sparse_dictionary(
        SyntheticConfig(tokens=32_768, d_in=32, num_features=128, mean_active=5)
    )
    return x, dictionary
