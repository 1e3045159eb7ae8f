"""`ShuffleBuffer`: a bounded, seeded shuffle buffer of activation rows, one per SAE of a streaming run.

`vlens.sae.train_many` reads activations straight from the model's forward passes, so
consecutive rows come from the same images and captions. Each SAE mixes them through its
own buffer: new rows are appended; once `capacity` rows are held, every step draws
`batch_size` of them uniformly at random (without replacement) from a generator seeded by
the SAE's `seed`, and the last rows fill the holes (each step moves `batch_size` rows, not
the whole buffer). With `shuffle=False` it is a FIFO queue: batch k is rows k·b … (k+1)·b
of the stream, exactly the batches `train(store, shuffle=False)` reads from a store
harvested from the same data.

The buffer holds at most `capacity` + the rows of one forward (+ the `n_norm_batches`
batches that fix the activation scale, at the start). `state_dict()` holds the rows, their
modality codes and the generator state, so a checkpointed run resumes bit-identically.

Why not SAE-Lens's `mixing_buffer`: it is a generator over an iterator (its state cannot be
saved and restored mid-stream), draws from torch's global generator, and concatenates the
whole buffer on every forward; vlens needs a buffer whose state goes into a checkpoint.

    >>> import torch
    >>> buf = ShuffleBuffer(d=4, capacity=8, shuffle=False)
    >>> buf.add(torch.arange(40.).reshape(10, 4), torch.ones(10, dtype=torch.long))
    >>> x, mod = buf.take(3)
    >>> x[:, 0].tolist(), len(buf)
    ([0.0, 4.0, 8.0], 7)
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...errors import InputError

__all__ = ["ShuffleBuffer"]


class ShuffleBuffer:
    """Rows `[n, d]` with modality codes, served in batches (random draws once `capacity` rows are held, or FIFO).

    Args:
        d: row width.
        capacity: rows held before random draws start (the mixing window); `shuffle=False` ignores it.
        shuffle: draw uniformly at random (True) or first-in first-out (False).
        seed: seeds the buffer's own `torch.Generator` (the global one is never touched).
        dtype: storage dtype (rows are returned as float32).

    Example:
        >>> import torch
        >>> buf = ShuffleBuffer(d=2, capacity=4, seed=0)
        >>> buf.add(torch.randn(6, 2), torch.zeros(6, dtype=torch.long))
        >>> buf.ready(2), buf.take(2)[0].shape, len(buf)
        (True, torch.Size([2, 2]), 4)
    """

    def __init__(self, d: int, capacity: int, *, shuffle: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise InputError(f"the shuffle buffer must hold at least one row (buffer= rows), not {capacity!r}")
        self.d, self.capacity, self.shuffle, self.dtype = int(d), capacity, bool(shuffle), dtype
        self.rows = torch.empty(0, self.d, dtype=dtype)
        self.mod = torch.empty(0, dtype=torch.int8)
        self.head = 0  # first held row (FIFO); always 0 when shuffling
        self.n = 0
        self.generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 104_729)

    def __len__(self) -> int:
        return self.n

    def _room(self, extra: int) -> None:
        """Make space for `extra` more rows after the held ones (compact a FIFO, grow ×2 when full)."""
        if self.head + self.n + extra <= self.rows.shape[0]:
            return
        if self.head:
            self.rows[: self.n] = self.rows[self.head : self.head + self.n].clone()
            self.mod[: self.n] = self.mod[self.head : self.head + self.n].clone()
            self.head = 0
        if self.n + extra > self.rows.shape[0]:
            size = max(self.n + extra, 2 * self.rows.shape[0])
            rows = torch.empty(size, self.d, dtype=self.dtype)
            mod = torch.empty(size, dtype=torch.int8)
            rows[: self.n] = self.rows[: self.n]
            mod[: self.n] = self.mod[: self.n]
            self.rows, self.mod = rows, mod

    def add(self, x: Float[Tensor, "rows d"], mod: Int[Tensor, " rows"]) -> None:
        """Append rows `x` (and their modality codes, 1 image / 0 text) after those held."""
        if x.ndim != 2 or x.shape[1] != self.d:
            raise InputError(f"rows of shape {tuple(x.shape)} cannot join a buffer of width {self.d}")
        k = x.shape[0]
        self._room(k)
        end = self.head + self.n
        self.rows[end : end + k] = x
        self.mod[end : end + k] = mod
        self.n += k

    def first(self, k: int) -> Float[Tensor, "k d"]:
        """The first `k` rows held, in stream order while nothing has been drawn (for the activation scale)."""
        return self.rows[self.head : self.head + min(k, self.n)].float()

    def ready(self, batch_size: int, hold: int = 0) -> bool:
        """Whether a batch can be drawn: `batch_size` rows (FIFO) or `max(capacity, hold)` rows (shuffling)."""
        need = max(batch_size, hold) if not self.shuffle else max(self.capacity, batch_size, hold)
        return self.n >= need

    def take(self, batch_size: int) -> tuple[Float[Tensor, "batch d"], Int[Tensor, " batch"]]:
        """Remove and return `batch_size` rows (float32) and their modality codes."""
        if batch_size > self.n:
            raise InputError(f"cannot draw {batch_size} rows from a buffer holding {self.n}")
        if not self.shuffle:
            sl = slice(self.head, self.head + batch_size)
            x, mod = self.rows[sl].float(), self.mod[sl].long()
            self.head += batch_size
            self.n -= batch_size
            if self.n == 0:
                self.head = 0
            return x, mod
        n = self.n
        pick = torch.randperm(n, generator=self.generator)[:batch_size]
        x, mod = self.rows[pick].float(), self.mod[pick].long()
        # Fill the holes below the new end with the tail rows that were not drawn.
        end = n - batch_size
        holes = pick[pick < end].sort().values
        tail = torch.ones(batch_size, dtype=torch.bool)
        tail[pick[pick >= end] - end] = False
        movers = tail.nonzero().flatten() + end
        self.rows[holes] = self.rows[movers]
        self.mod[holes] = self.mod[movers]
        self.n = end
        return x, mod

    def clear(self) -> None:
        """Drop every row and free the storage (an SAE that finished needs none)."""
        self.rows = torch.empty(0, self.d, dtype=self.dtype)
        self.mod = torch.empty(0, dtype=torch.int8)
        self.head = self.n = 0

    def state_dict(self) -> dict[str, Tensor]:
        """The held rows, their codes and the generator state: what `load_state_dict` restores exactly."""
        sl = slice(self.head, self.head + self.n)
        return {"rows": self.rows[sl].contiguous(), "mod": self.mod[sl].contiguous(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned (rows, codes, generator state).

        Example:
            >>> import torch
            >>> a = ShuffleBuffer(d=2, capacity=4, seed=1); a.add(torch.randn(6, 2), torch.zeros(6))
            >>> b = ShuffleBuffer(d=2, capacity=4, seed=9); b.load_state_dict(a.state_dict())
            >>> torch.equal(a.take(2)[0], b.take(2)[0])
            True
        """
        rows = state["rows"]
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise InputError(f"a saved buffer of shape {tuple(rows.shape)} does not fit width {self.d}")
        self.rows = rows.to(self.dtype).clone()
        self.mod = state["mod"].to(torch.int8).clone()
        self.head, self.n = 0, int(rows.shape[0])
        self.generator.set_state(state["generator"].clone())
