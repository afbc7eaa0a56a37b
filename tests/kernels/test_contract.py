"""Every backend implements its op's contract (``mode_kernels.contract``) in full, with the protocol's signature."""
import inspect

import pytest

from mode_kernels import backends
from mode_kernels.contract import PROTOCOLS, RoutedLoraGrads, RoutedLoraNeeds


def _available(backend: str, op: str) -> bool:
    if backend == "native":
        return backends.native_available()
    return backend == "torch" or backends.triton_available(op)


def _members(protocol: type) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("op", PROTOCOLS)
def test_each_backend_implements_its_ops_protocol(op, backend):
    if not _available(backend, op):
        pytest.skip(f"backend {backend} unavailable here")
    impl, protocol = backends.implementation(backend, op), PROTOCOLS[op]
    assert isinstance(impl, protocol)
    for name in _members(protocol):
        expected = list(inspect.signature(getattr(protocol, name)).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(impl, name)).parameters) == expected, f"{backend}.{name}"


def test_gradients_are_named_as_the_needs():
    assert RoutedLoraGrads._fields == RoutedLoraNeeds._fields
