"""Activations: read them from a forward (`read_layers`), harvest them to disk at scale (`harvest`), read stores back.

| module       | holds                                                                     |
|--------------|---------------------------------------------------------------------------|
| `read`       | `read_layers`: the one way vlens reads activations out of a forward; `pool_features` in memory |
| `harvesting` | `harvest`: the loop over a data set (one process or torchrun), `vlens harvest` |
| `writer`     | the atomic shard / index writer (interrupted harvests resume)             |
| `store`      | `ActivationStore`, `ActivationRows`: the store format and its reader      |
| `sae_lens`   | `export_sae_lens`: a store layer as SAE-Lens's cached-activation dataset  |
| `figures`    | `selection_grid`, `selection_figure`, `selection_png`: what a selection keeps |

    >>> import vlens, tempfile
    >>> from vlens.data import Sample
    >>> from PIL import Image
    >>> data = [Sample(Image.new("RGB", (32, 32)), label=i % 2) for i in range(4)]
    >>> store = vlens.activations.harvest(vlens.tiny(), data, layers=[1], pool="mean", out=tempfile.mkdtemp(),
    ...                                   progress=False)
    >>> store.pooled(1)[0].shape
    torch.Size([4, 64])
"""

from ..errors import HarvestError
from .figures import selection_figure, selection_grid
from .harvesting import harvest
from .read import pool_features, read_layers
from .sae_lens import export_sae_lens
from .store import ActivationRows, ActivationStore

__all__ = [
    "read_layers", "pool_features", "harvest", "ActivationStore", "ActivationRows", "export_sae_lens", "selection_figure",
    "selection_grid", "HarvestError",
]
