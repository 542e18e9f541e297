"""A recorder of device-to-host reads, shared by the op's and the processors' sync tests.

A host read is what stalls a GPU: ``.item()`` / ``.tolist()`` / ``bool(tensor)`` / ops whose output size depends on
the data (``nonzero``, ``masked_select``, ``unique``). :class:`HostReads` sees the dispatcher-level ones
(``aten._local_scalar_dense`` and friends) and, since ``Tensor.tolist`` / ``numpy`` on CPU tensors bypass the
dispatcher, wraps those Python methods too.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ_OPS = {
    "aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default",
    "aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default", "aten.bincount.default",
    # a tensor made from host data (torch.tensor(list)): on a GPU a blocking host-to-device copy, which
    # torch.cuda.set_sync_debug_mode("error") rejects as well
    "aten.lift_fresh.default", "aten.lift_fresh_copy.default",
}  # fmt: skip


class HostReads(TorchDispatchMode):
    """Records every device-to-host read (see the module docstring)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads: list[str] = []
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def wrapper(t, *args, _name=name, _original=original, **kwargs):
                self.reads.append(f"Tensor.{_name}")
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READ_OPS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))
