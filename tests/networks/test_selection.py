import pytest
import torch

from fpt_monai.networks import mean_received_attention, num_selected_tokens, select_important_tokens


def naive_selection(q, k, v, ratio):
    """Reference: full attention matrix, received attention per token by explicit loops over queries."""
    b, h, n, d = k.shape
    attention = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
    keep = int(n * ratio)
    k_out = torch.empty(b, h, keep, d)
    v_out = torch.empty(b, h, keep, d)
    for bi in range(b):
        for hi in range(h):
            received = [sum(attention[bi, hi, i, j].item() for i in range(n)) / n for j in range(n)]
            order = sorted(range(n), key=lambda j: -received[j])[:keep]
            order.sort()
            k_out[bi, hi] = k[bi, hi, order]
            v_out[bi, hi] = v[bi, hi, order]
    return k_out, v_out


@pytest.mark.parametrize("n,ratio", [(17, 0.2), (33, 0.5), (10, 1.0), (65, 0.25)])
def test_selection_matches_naive_reference(n, ratio):
    torch.manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8) for _ in range(3))
    attention = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    k_sel, v_sel = select_important_tokens(k, v, mean_received_attention(attention), ratio)
    k_ref, v_ref = naive_selection(q, k, v, ratio)
    assert k_sel.shape == (2, 3, int(n * ratio), 8)
    torch.testing.assert_close(k_sel, k_ref)
    torch.testing.assert_close(v_sel, v_ref)


def test_reference_figure_keeps_205_of_1025_tokens():
    assert num_selected_tokens(1025, 0.2) == 205
    assert num_selected_tokens(65, 0.2) == 13


def test_heads_select_independently():
    # head 0 attends to token 1 most, head 1 to token 3: each head keeps its own token.
    k = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 1).clone()
    importance = torch.tensor([[[0.0, 9.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 9.0, 0.0]]])
    k_sel, _ = select_important_tokens(k, k.clone(), importance, 0.2)
    assert k_sel.flatten().tolist() == [1.0, 3.0]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="token_ratio"):
        num_selected_tokens(100, ratio)


def test_ratio_that_keeps_nothing_raises():
    with pytest.raises(ValueError, match="keeps no token"):
        num_selected_tokens(4, 0.2)


def test_shape_mismatch_raises():
    k = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="same shape"):
        select_important_tokens(k, torch.randn(1, 2, 9, 4), torch.rand(1, 2, 10), 0.5)
    with pytest.raises(ValueError, match="importance"):
        select_important_tokens(k, k, torch.rand(1, 2, 9), 0.5)
    with pytest.raises(ValueError, match="attention"):
        mean_received_attention(torch.rand(2, 10, 10))
