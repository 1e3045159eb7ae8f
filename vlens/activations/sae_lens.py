"""`export_sae_lens`: one layer of a harvest store as SAE-Lens's cached-activation dataset.

SAE-Lens's `ActivationsStore` reads cached activations from an HF dataset on disk
(`datasets.load_from_disk`); this writes a store's rows in that format, so SAE-Lens
trains straight from a vlens harvest with its own `ActivationsStore` and `SAETrainer`
(`docs/harvest.md` shows the route; SAE-Lens's runner with `use_cached_activations=True`
still loads a TransformerLens model by name, which a VLM is not).

The dataset is written by `datasets` and then made readable by `datasets` 3.x too (which
sae-bench and sae-dashboard pin): `datasets` 4 names a fixed-length sequence feature `List`,
which 3.x does not know, so the feature is written under its 3.x name `Sequence`, which
every version reads (in `dataset_info.json` and in the Arrow files' schema metadata).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..sites import Site

if TYPE_CHECKING:
    from .store import ActivationStore

__all__ = ["export_sae_lens"]


def export_sae_lens(store: "ActivationStore", layer: int | str | Site, path: str | os.PathLike, *, context_size: int = 128,
                    modality: str | None = None, shuffle: bool = True, seed: int = 0,
                    dtype: str = "float32") -> dict:
    """Write one layer of a store as an HF dataset on disk, the format SAE-Lens's trainer reads as cached activations.

    SAE-Lens reads a `datasets.load_from_disk` dataset with one `Array2D`
    column named after the hook (`blocks.L.hook_resid_pre`) of shape
    `[context_size, d_in]` per row, plus `token_ids` `[context_size]`. The
    store's rows (tokens) are grouped `context_size` at a time (rows are
    shuffled first by default, so each pseudo-sequence mixes samples; the last
    incomplete group is dropped). Returns what SAE-Lens needs to read it:
    `cached_activations_path`, `hook_name`, `context_size` (arguments of
    `sae_lens.training.activations_store.ActivationsStore`), `d_in` (of the SAE config and
    the store), `n_tokens` (tokens written: at most `total_training_tokens`) and
    `use_cached_activations=True`. The dataset reads in `datasets` 3.x and later.

    Example:
        >>> import vlens, tempfile; from PIL import Image
        >>> from vlens.activations import harvest
        >>> data = [vlens.data.Sample(Image.new("RGB", (32, 32)))] * 2
        >>> store = harvest(vlens.tiny(), data, layers=[1], out=tempfile.mkdtemp(), progress=False)
        >>> cfg = export_sae_lens(store, 1, tempfile.mkdtemp() + "/acts", context_size=16)
        >>> cfg["hook_name"], cfg["d_in"], cfg["n_tokens"] % 16
        ('blocks.1.hook_resid_pre', 64, 0)
    """
    import datasets
    from datasets import Array2D, Features, Sequence as HFSequence, Value

    view = store.filter(modality=modality) if modality is not None else store
    hook = store.hook_name(layer)
    d = store.d_model
    n_seq = len(view) // context_size
    if n_seq == 0:
        raise InputError(f"the store has {len(view)} rows, fewer than context_size={context_size}: lower context_size")
    features = Features({hook: Array2D(shape=(context_size, d), dtype=dtype),
                         "token_ids": HFSequence(Value("int32"), length=context_size)})
    token_ids = view.meta["token_id"]
    x = view.activations(layer)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(view), generator=g)[: n_seq * context_size] if shuffle else torch.arange(n_seq * context_size)
    np_dtype = getattr(torch, dtype)

    def gen():
        step = max(1, 4096 // context_size)
        for s in range(0, n_seq, step):
            idx = perm[s * context_size : min(s + step, n_seq) * context_size]
            a = x[idx].to(np_dtype).reshape(-1, context_size, d).numpy()
            t = token_ids[idx].to(torch.int32).reshape(-1, context_size).numpy()
            for i in range(len(a)):
                yield {hook: a[i], "token_ids": t[i]}

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty: export to a new directory")
    cache = Path(tempfile.mkdtemp(prefix="vlens-sae-lens-"))
    try:
        ds = datasets.Dataset.from_generator(gen, features=features, cache_dir=str(cache))
        ds.save_to_disk(str(path))
        del ds
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    _portable_features(path)
    return {
        "use_cached_activations": True,
        "cached_activations_path": str(path),
        "hook_name": hook,
        "d_in": d,
        "context_size": context_size,
        "n_tokens": n_seq * context_size,
    }



def _sequence_named(obj: Any) -> Any:
    """Features JSON with `datasets` 4's `List` (fixed length) renamed to `Sequence`, the name 3.x reads."""
    if isinstance(obj, dict):
        out = {k: _sequence_named(v) for k, v in obj.items()}
        if out.get("_type") == "List":
            out["_type"] = "Sequence"
        return out
    if isinstance(obj, list):
        return [_sequence_named(v) for v in obj]
    return obj


def _portable_features(path: Path) -> None:
    """Rewrite a saved dataset's feature names so `datasets` 3.x loads it (the data is copied as is, batch by batch)."""
    import pyarrow as pa

    info = path / "dataset_info.json"
    info.write_text(json.dumps(_sequence_named(json.loads(info.read_text())), indent=2))
    for arrow in sorted(path.glob("*.arrow")):
        tmp = arrow.with_suffix(".arrow.tmp")
        with pa.memory_map(str(arrow)) as src:
            reader = pa.ipc.open_stream(src)
            meta = dict(reader.schema.metadata or {})
            if b"huggingface" in meta:
                meta[b"huggingface"] = json.dumps(_sequence_named(json.loads(meta[b"huggingface"]))).encode()
            schema = reader.schema.with_metadata(meta)
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for batch in reader:
                    writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
        os.replace(tmp, arrow)
