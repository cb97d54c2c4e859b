"""Important token selection (FPT, Huang et al., MICCAI 2024, Sec. "Important tokens selection").

The frozen backbone's keys and values are long sequences at high resolution (1025 tokens for ViT-B/16 at
512x512). FPT keeps, per block and per head, only the tokens that receive the most attention, which shrinks
both the fusion module's compute and the preloading cache.
"""

from __future__ import annotations

import torch

__all__ = [
    "num_selected_tokens",
    "mean_received_attention",
    "important_token_indices",
    "select_important_tokens",
    "selection_frequency",
]


def num_selected_tokens(num_tokens: int, token_ratio: float) -> int:
    """Number of tokens kept out of ``num_tokens``: ``int(num_tokens * token_ratio)``.

    Args:
        num_tokens: sequence length N of the backbone (prefix tokens included).
        token_ratio: fraction of tokens to keep, in (0, 1].

    Raises:
        ValueError: when the ratio is outside (0, 1] or keeps no token at all.
    """
    if not 0.0 < token_ratio <= 1.0:
        raise ValueError(f"token_ratio must be in (0, 1], got {token_ratio}.")
    k = int(num_tokens * token_ratio)
    if k < 1:
        raise ValueError(f"token_ratio={token_ratio} keeps no token of {num_tokens}; raise the ratio.")
    return k


def mean_received_attention(attention: torch.Tensor) -> torch.Tensor:
    """Importance of every token: the attention it receives, averaged over all queries.

    Args:
        attention: softmax attention probabilities of shape (B, H, N_query, N_key).

    Returns:
        Tensor of shape (B, H, N_key): ``attention.mean(dim=-2)``.
    """
    if attention.ndim != 4:
        raise ValueError(f"attention must have shape (B, H, N, N), got {tuple(attention.shape)}.")
    return attention.mean(dim=-2)


def important_token_indices(importance: torch.Tensor, token_ratio: float) -> torch.Tensor:
    """Indices of the ``int(N * token_ratio)`` most important tokens per sample and head, in ascending order.

    Args:
        importance: (B, H, N) per-token importance, e.g. :func:`mean_received_attention`.
        token_ratio: fraction of the N tokens to keep, in (0, 1].

    Returns:
        Long tensor of shape (B, H, k) with ``k = int(N * token_ratio)``, sorted along the last dim (so the
        result does not depend on how ``topk`` orders it).
    """
    if importance.ndim != 3:
        raise ValueError(f"importance must have shape (B, H, N), got {tuple(importance.shape)}.")
    k = num_selected_tokens(importance.shape[2], token_ratio)
    return importance.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def select_important_tokens(
    keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor, token_ratio: float, return_indices: bool = False
) -> tuple[torch.Tensor, ...]:
    """Keep, per sample and head, the ``int(N * token_ratio)`` keys/values with the highest importance.

    The kept tokens are returned in their original sequence order (ascending index,
    :func:`important_token_indices`); attention over them is order-invariant anyway.

    Args:
        keys: (B, H, N, D) keys of one backbone block.
        values: (B, H, N, D) values of the same block.
        importance: (B, H, N) per-token importance, e.g. :func:`mean_received_attention`.
        token_ratio: fraction of the N tokens to keep, in (0, 1].
        return_indices: also return the kept tokens' indices (B, H, k) (for selection maps).

    Returns:
        ``(selected_keys, selected_values)``, each of shape (B, H, k, D) with ``k = int(N * token_ratio)``,
        followed by the indices when ``return_indices``.
    """
    if keys.ndim != 4 or keys.shape != values.shape:
        raise ValueError(
            f"keys and values must have the same shape (B, H, N, D), got {tuple(keys.shape)} "
            f"and {tuple(values.shape)}."
        )
    if importance.shape != keys.shape[:3]:
        raise ValueError(f"importance must have shape {tuple(keys.shape[:3])}, got {tuple(importance.shape)}.")
    indices = important_token_indices(importance, token_ratio)
    index = indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    selected = keys.gather(2, index), values.gather(2, index)
    return (*selected, indices) if return_indices else selected


def selection_frequency(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Fraction of the (block, head) pairs that kept each token.

    Args:
        indices: (B, L, H, k) indices of the tokens kept by each of L blocks and H heads
            (:func:`important_token_indices` of every extracted block).
        num_tokens: sequence length N.

    Returns:
        Float tensor (B, N) in [0, 1]: 1 where every block and head kept the token, 0 where none did.
    """
    if indices.ndim != 4:
        raise ValueError(f"indices must have shape (B, L, H, k), got {tuple(indices.shape)}.")
    b, blocks, heads, _ = indices.shape
    counts = torch.zeros(b, num_tokens, dtype=torch.float32, device=indices.device)
    counts.scatter_add_(1, indices.reshape(b, -1), torch.ones(indices.reshape(b, -1).shape, device=indices.device))
    return counts / (blocks * heads)
