"""Frozen CNN backbone adapter: a pre-trained convolutional network -> per-block keys/values for FPT.

**An extension of FPT, not part of the papers.** FPT (Huang et al., MICCAI 2024) and FPT+ (IEEE TNNLS 2025)
take the attention keys/values of a frozen ViT. A CNN has no attention, so this adapter builds the same
interface (:class:`~fpt_monai.networks.backbones.FrozenBackbone`: ``forward(images) -> (B, L, 2, H, k, D)``)
from the feature maps of chosen convolutional blocks:

- **Blocks.** Every residual block of the network (for timm's EfficientNet family: every MBConv / depthwise
  block of ``model.blocks``, flattened in order) is one "block"; ``blocks`` picks the extracted ones.
- **Tokens.** The block's output feature map is brought to a fixed token grid of ``img_size // grid_stride``
  cells per side: area-averaged when the map is finer, nearest-neighbour upsampled when it is coarser, unchanged
  when it has the grid's stride. Token 0 is the mean of all grid tokens (the counterpart of a class token),
  tokens 1..N follow in row-major grid order, so ``num_tokens = 1 + (img_size // grid_stride) ** 2``
  (1025 at 512 with stride 16, as ViT-B/16 at 512).
- **Keys and values.** The tokens are divided by their root-mean-square over the image (one scalar per image and
  block), then standardised by a fixed per-block affine map, ``(t - centre) / scale`` (``centre``: one value per
  channel, ``scale``: one scalar; identity until :meth:`FrozenCNNBackbone.calibrate` sets them, see below), and
  multiplied by a *fixed* matrix with orthonormal rows, ``(channels, num_heads * head_dim)``, drawn once from a
  seed (``projection_seed``) or loaded with the weights; the result, split into heads, is both the keys and the
  values. Nothing is learnt from labels: with ``channels <= num_heads * head_dim`` the projection is an isometry,
  so no information of the feature map is lost, and every head sees a mixture of all channels.
- **Calibration** (label-free): :meth:`FrozenCNNBackbone.calibrate` runs the backbone on unlabelled images of the
  target domain and sets, per block, ``centre`` = the mean over those images of the mean token and ``scale`` =
  the mean over channels of its standard deviation. Image-to-image differences of the features (e.g. how many
  small lesions an image has) then reach the fusion module at unit size instead of being a few percent of a
  large common component; without it FPT on the sample task did not learn within 20 epochs (see the demo
  backbone's card).
- **Importance** (for FPT's important token selection), per head: the distance of a token's head vector from
  the mean of all grid tokens' head vectors, ``||k_j^h - mean_t k_t^h||`` (tokens that stand out from the
  image's average, e.g. small lesions, rank high). The mean token (index 0) is always kept. The top
  ``int(num_tokens * token_ratio)`` tokens per head are kept, in sequence order, as for the ViT adapters.

The backbone's own output is unchanged by the extraction; blocks after the last extracted one are not run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpt_monai.networks.backbones.base import FrozenBackbone
from fpt_monai.networks.selection import select_important_tokens

__all__ = ["FrozenCNNBackbone", "orthonormal_projection", "projection_buffer_name"]


def orthonormal_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A fixed ``(in_dim, out_dim)`` matrix with orthonormal rows (``in_dim <= out_dim``) or columns, from a seed.

    Drawn on the CPU in float64 from ``torch.Generator().manual_seed(seed)`` (Gaussian, then QR), returned in
    float32. The shipped demo backbone stores its matrices with its weights, so its keys/values do not depend on
    the platform's random generator or LAPACK.
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"projection dims must be positive, got ({in_dim}, {out_dim}).")
    generator = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(max(in_dim, out_dim), min(in_dim, out_dim), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # q: (max, min), orthonormal columns
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    q = q * signs  # the sign convention of QR varies between LAPACK builds; fix it
    matrix = q.T if in_dim <= out_dim else q
    return matrix.contiguous().float()


def projection_buffer_name(block: int) -> str:
    """Name of the fixed key/value projection of a block in the state dict (``projection_<block>``)."""
    return f"projection_{block}"


class FrozenCNNBackbone(FrozenBackbone):
    """Frozen timm EfficientNet-family CNN as an FPT backbone (see the module docstring for the rules).

    Works for timm models with ``conv_stem``, ``bn1`` and ``blocks`` (a sequence of stages, each a sequence of
    blocks): ``efficientnet_*``, ``tf_efficientnet_*`` (lite included), ``mobilenetv2_*``, ``mixnet_*``... The
    model keeps its own layers; the adapter holds the fixed projections and calibration as buffers
    (``projection_<block>``, ``centre_<block>``, ``scale_<block>``; part of the state dict, hence of the
    preloading cache's identity).

    Args:
        model: the pre-trained CNN.
        img_size: the high input resolution (square), a multiple of ``grid_stride``.
        blocks: indices of the extracted blocks (into the flattened block list); ``None`` extracts all.
        token_ratio: fraction of the ``1 + grid**2`` tokens kept per block and head.
        grid_stride: pixels per token side (the ``patch_size`` the side network uses too).
        num_heads: heads of the keys/values.
        head_dim: width of one head.
        projection_seed: seed of the fixed projections (ignored for blocks whose projection is loaded later
            through :meth:`load_state_dict`).
        mean: per-channel input normalisation the weights were trained with.
        std: per-channel input normalisation the weights were trained with.
    """

    def __init__(
        self,
        model: nn.Module,
        img_size: int = 512,
        blocks: Sequence[int] | None = None,
        token_ratio: float = 0.2,
        grid_stride: int = 16,
        num_heads: int = 6,
        head_dim: int = 64,
        projection_seed: int = 0,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        for attr in ("conv_stem", "bn1", "blocks"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"FrozenCNNBackbone needs a timm EfficientNet-family model (conv_stem, bn1, blocks); "
                    f"{type(model).__name__} has no `{attr}`."
                )
        flat = [block for stage in model.blocks for block in stage]
        super().__init__(model, flat, blocks, token_ratio)
        img_size, grid_stride = int(img_size), int(grid_stride)
        if grid_stride < 1 or img_size % grid_stride:
            raise ValueError(f"img_size {img_size} must be a positive multiple of grid_stride {grid_stride}.")
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads and head_dim must be positive, got {num_heads}, {head_dim}.")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.grid = img_size // grid_stride
        self.grid_stride = grid_stride
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.block_channels = self._probe_channels(flat)
        width = self.num_heads * self.head_dim
        for b in self.extracted_blocks:
            channels = self.block_channels[b]
            self.register_buffer(
                projection_buffer_name(b), orthonormal_projection(channels, width, seed=int(projection_seed) * 1000 + b)
            )
            self.register_buffer(f"centre_{b}", torch.zeros(channels))
            self.register_buffer(f"scale_{b}", torch.ones(()))
        self._set_shape(
            spatial_dims=2,
            in_channels=model.conv_stem.in_channels,
            img_size=(img_size, img_size),
            patch_size=(grid_stride, grid_stride),
            embed_dim=width,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_tokens=1 + self.grid * self.grid,
        )
        self.train(False)

    def _probe_channels(self, flat: Sequence[nn.Module]) -> list[int]:
        """Output channels of every block (read from the blocks' last convolution or batch norm)."""
        channels = []
        for index, block in enumerate(flat):
            last = None
            for module in block.modules():
                if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                    last = module
            if last is None:
                raise TypeError(f"block {index} ({type(block).__name__}) has no convolution to read its width from.")
            channels.append(last.out_channels if isinstance(last, nn.Conv2d) else last.num_features)
        return channels

    def projection(self, block: int) -> torch.Tensor:
        """The fixed (channels, num_heads * head_dim) projection of an extracted block."""
        return getattr(self, projection_buffer_name(block))

    # -- feature maps -> tokens -> keys/values ----------------------------------------------------------
    def to_grid(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature map -> (B, 1 + grid**2, C) tokens on the grid, the mean token first."""
        size = features.shape[-2:]
        if tuple(size) != (self.grid, self.grid):
            if size[0] >= self.grid and size[0] % self.grid == 0 and size[1] % self.grid == 0:
                features = F.adaptive_avg_pool2d(features, self.grid)
            else:
                features = F.interpolate(features, size=(self.grid, self.grid), mode="nearest")
        tokens = features.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def normalised_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Grid tokens (B, 1 + grid**2, C) divided by their root-mean-square over the image (per image)."""
        tokens = self.to_grid(features.float())
        rms = tokens[:, 1:].pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-6)
        return tokens / rms

    def standardised_tokens(self, block: int, features: torch.Tensor) -> torch.Tensor:
        """:meth:`normalised_tokens` after the block's calibration, ``(t - centre) / scale``."""
        centre, scale = getattr(self, f"centre_{block}"), getattr(self, f"scale_{block}")
        return (self.normalised_tokens(features) - centre) / scale

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Set every extracted block's ``centre``/``scale`` from unlabelled images (see the module docstring).

        Args:
            batches: image batches (B, C, img_size, img_size), normalised like the backbone's inputs; at least two
                images in all. Labels are never used.

        Returns:
            ``{block: (centre, scale)}`` as set. The preloading cache fingerprint covers them (they are buffers), so
            keys/values cached before a calibration are not reused after it.
        """
        sums: dict[int, list[torch.Tensor]] = {b: [] for b in self.extracted_blocks}
        for images in batches:
            for index, x in self._extracted_features(images):
                sums[index].append(self.normalised_tokens(x)[:, 0])
        result = {}
        for b, chunks in sums.items():
            means = torch.cat(chunks)
            if len(means) < 2:
                raise ValueError("calibrate needs at least two images.")
            centre, scale = means.mean(0), means.std(0).mean().clamp_min(1e-6)
            getattr(self, f"centre_{b}").copy_(centre)
            getattr(self, f"scale_{b}").copy_(scale)
            result[b] = (centre, scale)
        return result

    def block_kv(
        self, block: int, features: torch.Tensor, return_indices: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Selected keys/values (B, 2, H, k, D) of one extracted block's feature map (B, C, h, w), and with
        ``return_indices`` the indices (B, H, k) of the selected tokens."""
        kv = self.standardised_tokens(block, features) @ self.projection(block)  # (B, N, H * D)
        b, n, _ = kv.shape
        kv = kv.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        importance = (kv - kv[:, :, :1]).norm(dim=-1)  # token 0 is the mean of the grid tokens
        importance[:, :, 0] = float("inf")
        k_sel, v_sel, indices = select_important_tokens(kv, kv, importance, self.token_ratio, return_indices=True)
        selected = torch.stack((k_sel, v_sel), dim=1)
        return (selected, indices) if return_indices else selected

    def _block_outputs(self, images: torch.Tensor, last: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(index, feature map)`` after every block up to ``last``: the one walk through the network."""
        self.check_input(images)
        m = self.model
        x = m.bn1(m.conv_stem(images))
        for index, block in enumerate(self._blocks[: last + 1]):
            x = block(x)
            yield index, x

    def _extracted_features(self, images: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """``(block, feature map)`` of every extracted block; blocks after the last extracted one are not run."""
        for index, x in self._block_outputs(images, self.extracted_blocks[-1]):
            if index in self.extracted_blocks:
                yield index, x

    def _walk(self, images: torch.Tensor, all_blocks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values (B, L, 2, H, k, D), the last block's feature map and the selected indices (B, L, H, k)."""
        selected, indices = [], []
        for index, x in self._block_outputs(images, self.depth - 1 if all_blocks else self.extracted_blocks[-1]):
            if index in self.extracted_blocks:
                kv, kept = self.block_kv(index, x, return_indices=True)
                selected.append(kv)
                indices.append(kept)
        return torch.stack(selected, dim=1), x, torch.stack(indices, dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Selected keys/values (B, L, 2, H, k, D) of the extracted blocks (same contract as the ViT adapters).

        Args:
            images: (B, C, img_size, img_size), normalised like the pre-training data.
        """
        return self._walk(images, all_blocks=False)[0]

    @torch.no_grad()
    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected keys/values as :meth:`forward`, plus the model's final features as grid tokens.

        The final features are the model's head convolution output (``conv_head``/``bn2`` when the model has
        them, else the last block's output) as (B, 1 + grid**2, C) tokens, mean token first.
        """
        kv, x, _ = self._walk(images, all_blocks=True)
        m = self.model
        if hasattr(m, "conv_head") and hasattr(m, "bn2"):
            x = m.bn2(m.conv_head(x))
        return kv, self.to_grid(x)

    @torch.no_grad()
    def selected_token_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Indices (B, L, H, k) of the tokens :meth:`forward` keeps (its own walk and selection)."""
        return self._walk(images, all_blocks=False)[2]

    @torch.no_grad()
    def block_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Grid tokens (B, 1 + grid**2, C_l) of every extracted block, as they come (for probes)."""
        return [self.to_grid(x) for _, x in self._extracted_features(images)]
