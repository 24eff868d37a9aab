import pytest

from qutil import record, tiny_unet


@pytest.fixture(scope="session")
def unet():
    return tiny_unet()


@pytest.fixture(scope="session")
def calls(unet):
    return record(unet)
