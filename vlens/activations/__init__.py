"""Activations: read them from a forward (`read_layers`), harvest them to disk at scale (`harvest`), read stores back.

    >>> import vlens, tempfile
    >>> from vlens.data import Sample
    >>> from PIL import Image
    >>> data = [Sample(Image.new("RGB", (32, 32)), label=i % 2) for i in range(4)]
    >>> store = vlens.harvest(vlens.tiny(), data, layers=[1], pool="mean", out=tempfile.mkdtemp(), progress=False)
    >>> store.pooled(1)[0].shape
    torch.Size([4, 64])
"""

from .read import read_layers

# Until the harvest moves into this package (transitional; see docs/architecture.md).
from ..harvest import ActivationStore, ActivationRows, HarvestError, export_sae_lens, harvest  # noqa: E402

__all__ = ["read_layers", "harvest", "ActivationStore", "ActivationRows", "HarvestError", "export_sae_lens"]
