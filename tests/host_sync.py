"""A dispatch mode that fails on any op that waits on the device or copies host data to it."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostSync(TorchDispatchMode):
    """Fails on ops that copy device data to the host (.item(), .tolist(), nonzero, ...) and on copies
    between devices (a host-to-device copy of a Python list or a cache made at first use)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
    COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        assert func not in self.SYNCING, f"host sync: {func}"
        if func in self.COPIES:
            src, dst = args[0], (args[1] if len(args) > 1 else None)
            devices = {t.device for t in (src, dst) if isinstance(t, torch.Tensor)}
            if "device" in kwargs and kwargs["device"] is not None:
                devices.add(torch.device(kwargs["device"]))
            assert len(devices) == 1, f"copy between devices: {func} {devices}"
        return func(*args, **kwargs)
