"""Peak tensor memory on any device: torch's CUDA counters on a GPU, a dispatch-mode count elsewhere.

The CPU allocator keeps no statistics (and `tracemalloc` never sees torch's
buffers), so on the CPU and the meta device `PeakMemory` counts the bytes of
every fresh storage an operator returns (outputs that alias an input, views and
in-place results, are not fresh) until the storage is freed. That is what
`torch.cuda.max_memory_allocated` measures on a GPU, less the allocator's
rounding and the kernels' private workspaces.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(tree_leaves(out)):
            aliased = i < len(returns) and returns[i].alias_info is not None
            if isinstance(t, torch.Tensor) and not aliased:
                self._add(t.untyped_storage())
        return out

    def _add(self, st: Any) -> None:
        key = st._cdata
        if key in self._seen:
            return
        n = st.nbytes()
        self._seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n


class PeakMemory:
    """Context manager: `.peak` is the most bytes allocated at once inside it, above what was live at entry.

    Example:
        >>> with PeakMemory("cpu") as m:
        ...     x = torch.ones(1000) + 1          # 4000 bytes
        ...     y = (x * 2).sum()
        >>> m.peak >= 4000
        True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._count = _Count()
            self._count.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._count.__exit__(*exc)
            self.peak = self._count.peak
