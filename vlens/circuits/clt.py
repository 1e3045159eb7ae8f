"""Cross-layer transcoders (Ameisen et al. 2025): each feature reads one layer's MLP input and writes to the MLP
output of that layer and of every later one.

A per-layer transcoder must rebuild a computation spread over several MLPs
with one feature per layer; a cross-layer feature can write all of it at
once, so graphs get shorter paths. `CrossLayerTranscoder` plugs into
`LocalReplacement` / `attribute` / `intervene` wherever a list of per-layer
transcoders goes.

Stored in circuit-tracer's file layout (its `CrossLayerTranscoder.to_safetensors`
/ `load_clt`): `W_enc_{L}.safetensors` holding `W_enc_{L}` [d_sae, d_model],
`b_enc_{L}`, `b_dec_{L}`, and `W_dec_{L}.safetensors` holding `W_dec_{L}`
[d_sae, n_layers - L, d_model], plus vlens's `vlens_clt.json` (sizes and hook
names). Why hand-rolled: SAE-Lens (6.54) has no cross-layer transcoder, and
circuit-tracer's class cannot be imported beside vlens (it pins
transformers <= 4.57.3). The features read vlens's `mlp_in.L` (after the MLP's
norm, as vlens's per-layer transcoders do), where circuit-tracer's default is
TransformerLens's `hook_resid_mid`: pass `feature_input_hook` to its `load_clt`.
ReLU features; JumpReLU and skip connections are not built.

`fit_clt` trains one on rows held in memory (`mlp_in` and `mlp_out` of all
layers for the same tokens, e.g. from `vlens.activations.read_layers`): MSE
summed over layers plus `l1` × Σ activation × the norm of the feature's whole
decoder (every output layer), Adam. vlens's streaming trainer (`train_many`)
trains independent dictionaries, one per site, and does not serve a model
whose loss couples all layers.

    >>> import torch
    >>> clt = CrossLayerTranscoder(n_layers=3, d_model=8, d_sae=4)
    >>> [tuple(w.shape) for w in clt.W_dec]
    [(4, 3, 8), (4, 2, 8), (4, 1, 8)]
    >>> clt(torch.randn(3, 5, 8)).shape        # [layers, rows, d_model] -> MLP outputs
    torch.Size([3, 5, 8])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError

__all__ = ["CrossLayerTranscoder", "fit_clt"]

CONFIG = "vlens_clt.json"


class CrossLayerTranscoder(torch.nn.Module):
    """A ReLU cross-layer transcoder over `n_layers` layers (circuit-tracer's parameter shapes).

    Example:
        >>> import torch
        >>> clt = CrossLayerTranscoder(n_layers=2, d_model=8, d_sae=4)
        >>> a = clt.encode_layer(torch.randn(5, 8), 0)
        >>> a.shape, bool((a >= 0).all())
        (torch.Size([5, 4]), True)
    """

    def __init__(self, n_layers: int, d_model: int, d_sae: int, hook_in: str = "blocks.{layer}.hook_mlp_in",
                 hook_out: str = "blocks.{layer}.hook_mlp_out") -> None:
        super().__init__()
        self.n_layers, self.d_model, self.d_sae = n_layers, d_model, d_sae
        self.hook_in, self.hook_out = hook_in, hook_out
        self.W_enc = torch.nn.Parameter(torch.zeros(n_layers, d_sae, d_model))
        self.b_enc = torch.nn.Parameter(torch.zeros(n_layers, d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(n_layers, d_model))
        self.W_dec = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(d_sae, n_layers - L, d_model)) for L in range(n_layers)])

    def encode_layer(self, x: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_sae"]:
        """The features of `layer` from its MLP input rows."""
        return torch.relu(x @ self.W_enc[layer].T + self.b_enc[layer])

    def decode(self, acts: list[Tensor]) -> list[Tensor]:
        """Each layer's predicted MLP output from every layer's features (`acts[L]` [..., d_sae]).

        Example:
            >>> import torch
            >>> clt = CrossLayerTranscoder(n_layers=2, d_model=8, d_sae=4)
            >>> [y.shape for y in clt.decode([torch.ones(3, 4), torch.ones(3, 4)])]
            [torch.Size([3, 8]), torch.Size([3, 8])]
        """
        return [sum(acts[src] @ self.W_dec[src][:, out - src] for src in range(out + 1)) + self.b_dec[out]
                for out in range(self.n_layers)]

    def forward(self, x: Float[Tensor, "layers n d_model"]) -> Float[Tensor, "layers n d_model"]:
        """MLP outputs of every layer from every layer's MLP inputs."""
        return torch.stack(self.decode([self.encode_layer(x[L], L) for L in range(self.n_layers)]))

    def hook_names(self, layer: int) -> tuple[str, str]:
        """(where `layer`'s features read, where its first decoder writes), SAE-Lens hook names."""
        return self.hook_in.format(layer=layer), self.hook_out.format(layer=layer)

    def save(self, path: str | Path) -> Path:
        """Write circuit-tracer's files (`W_enc_L` / `W_dec_L` safetensors) and `vlens_clt.json` into `path`.

        Example:
            >>> import tempfile
            >>> clt = CrossLayerTranscoder(n_layers=2, d_model=8, d_sae=4)
            >>> p = clt.save(tempfile.mkdtemp())
            >>> sorted(f.name for f in p.iterdir())
            ['W_dec_0.safetensors', 'W_dec_1.safetensors', 'W_enc_0.safetensors', 'W_enc_1.safetensors', 'vlens_clt.json']
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for L in range(self.n_layers):
            save_file({f"W_enc_{L}": self.W_enc[L].detach().contiguous(), f"b_enc_{L}": self.b_enc[L].detach(),
                       f"b_dec_{L}": self.b_dec[L].detach()}, root / f"W_enc_{L}.safetensors")
            save_file({f"W_dec_{L}": self.W_dec[L].detach().contiguous()}, root / f"W_dec_{L}.safetensors")
        cfg = {"n_layers": self.n_layers, "d_model": self.d_model, "d_sae": self.d_sae, "hook_in": self.hook_in,
               "hook_out": self.hook_out, "activation_function": "relu"}
        (root / CONFIG).write_text(json.dumps(cfg, indent=1))
        return root

    @classmethod
    def load(cls, path: str | Path) -> "CrossLayerTranscoder":
        """Read what `save` wrote (circuit-tracer's files; sizes from them when `vlens_clt.json` is absent).

        Example:
            >>> import tempfile
            >>> clt = CrossLayerTranscoder(n_layers=2, d_model=8, d_sae=4)
            >>> CrossLayerTranscoder.load(clt.save(tempfile.mkdtemp())).W_dec[1].shape
            torch.Size([4, 1, 8])
        """
        root = Path(path)
        encs = sorted(root.glob("W_enc_*.safetensors"))
        if not encs:
            raise InputError(f"{root} holds no W_enc_<layer>.safetensors: not a cross-layer transcoder folder "
                             "(CrossLayerTranscoder.save, or circuit-tracer's to_safetensors, writes one)")
        cfg: dict[str, Any] = json.loads((root / CONFIG).read_text()) if (root / CONFIG).exists() else {}
        first = load_file(root / "W_enc_0.safetensors")["W_enc_0"]
        clt = cls(cfg.get("n_layers", len(encs)), cfg.get("d_model", first.shape[1]),
                  cfg.get("d_sae", first.shape[0]), **{k: cfg[k] for k in ("hook_in", "hook_out") if k in cfg})
        with torch.no_grad():
            for L in range(clt.n_layers):
                enc = load_file(root / f"W_enc_{L}.safetensors")
                clt.W_enc[L].copy_(enc[f"W_enc_{L}"])
                clt.b_enc[L].copy_(enc[f"b_enc_{L}"])
                clt.b_dec[L].copy_(enc[f"b_dec_{L}"])
                clt.W_dec[L].copy_(load_file(root / f"W_dec_{L}.safetensors")[f"W_dec_{L}"])
        return clt

    @classmethod
    def random(cls, n_layers: int, d_model: int, d_sae: int, seed: int = 0) -> "CrossLayerTranscoder":
        """A randomly initialised one (for tests and docs).

        Example:
            >>> CrossLayerTranscoder.random(2, 8, 4).W_enc.abs().sum() > 0
            tensor(True)
        """
        clt = cls(n_layers, d_model, d_sae)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            clt.W_enc.copy_(torch.randn(clt.W_enc.shape, generator=gen) / d_model ** 0.5)
            clt.b_enc.copy_(0.1 * torch.randn(clt.b_enc.shape, generator=gen))
            clt.b_dec.copy_(0.01 * torch.randn(clt.b_dec.shape, generator=gen))
            for w in clt.W_dec:
                w.copy_(torch.randn(w.shape, generator=gen) / (d_sae * w.shape[1]) ** 0.5)
        return clt


def fit_clt(mlp_in: Float[Tensor, "n layers d_model"], mlp_out: Float[Tensor, "n layers d_model"], d_sae: int,
            steps: int = 2000, lr: float = 2e-3, l1: float = 1e-3, batch_size: int = 1024, seed: int = 0,
            progress: bool = True) -> CrossLayerTranscoder:
    """Train a cross-layer transcoder on rows of every layer's MLP input and output (the same tokens).

    Loss: Σ_layers ||prediction − mlp_out||² + `l1` Σ_features activation ×
    ||the feature's decoder over all its output layers||. The encoder starts
    at the decoder's transpose and `b_dec` at each layer's mean output.

    Example:
        >>> import torch
        >>> x = torch.randn(256, 2, 8)
        >>> y = torch.stack([x[:, 0] * 2, x[:, 0] + x[:, 1]], 1)
        >>> clt = fit_clt(x, y, d_sae=16, steps=300, lr=1e-2, l1=0, progress=False)
        >>> with torch.no_grad():
        ...     ev = 1 - (clt(x.transpose(0, 1)) - y.transpose(0, 1)).pow(2).sum() / y.pow(2).sum()
        >>> bool(ev > 0.5)
        True
    """
    if mlp_in.shape != mlp_out.shape or mlp_in.ndim != 3:
        raise InputError(f"mlp_in {tuple(mlp_in.shape)} and mlp_out {tuple(mlp_out.shape)} must both be "
                         "[rows, layers, d_model] (every layer's MLP input and output for the same tokens)")
    n, n_layers, d = mlp_in.shape
    clt = CrossLayerTranscoder.random(n_layers, d, d_sae, seed)
    with torch.no_grad():
        for L in range(n_layers):
            clt.W_enc[L].copy_(clt.W_dec[L][:, 0] / clt.W_dec[L][:, 0].norm(dim=1, keepdim=True))
        clt.b_enc.zero_()
        clt.b_dec.copy_(mlp_out.float().mean(0))
    opt = torch.optim.Adam(clt.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="fit cross-layer transcoder", disable=None if progress else True):
        i = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x, y = mlp_in[i].float().transpose(0, 1), mlp_out[i].float().transpose(0, 1)
        acts = [clt.encode_layer(x[L], L) for L in range(n_layers)]
        mse = (torch.stack(clt.decode(acts)) - y).pow(2).sum(-1).sum(0).mean()
        norms = [w.flatten(1).norm(dim=1) for w in clt.W_dec]
        sparsity = sum((a * s).sum(-1) for a, s in zip(acts, norms)).mean()
        loss = mse + l1 * sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clt.eval()
