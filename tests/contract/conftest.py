import pytest

from tests.contract.backends import HARNESSES


@pytest.fixture(params=sorted(HARNESSES), scope="module")
def harness(request):
    return HARNESSES[request.param]()
