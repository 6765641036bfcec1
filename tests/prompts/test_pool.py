"""Key-query selection and the pull term (L2P / DualPrompt cores) on hand-built keys."""

import pytest
import torch

from avalanche_merge.prompts import L2PConfig, PromptPool, key_scores, pull_term, select_prompts


def _keys_and_query():
    # a random rotation so that neither keys nor query are axis-aligned
    rot, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    base = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0],
                         [0.5, 0.5, 0.2, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    scale = torch.tensor([[2.0], [0.5], [3.0], [1.0], [7.0]], dtype=torch.float64)  # cosine ignores key norms
    keys = (base * scale) @ rot.T
    query = torch.tensor([[1.0, 0.05, 0, 0, 0, 0], [0.1, 1.0, 0, 0, 0, 0], [0.6, 0.4, 0.3, 0, 0, 0]],
                         dtype=torch.float64) @ rot.T * 4.0
    return keys, query


def test_hand_built_keys_give_expected_top_n_and_pull_reaches_only_selected_keys():
    keys, query = _keys_and_query()
    idx = select_prompts(key_scores(query, keys), 2)
    assert idx.tolist() == [[0, 1], [2, 3], [3, 1]]
    keys = keys.clone().requires_grad_(True)
    pull = pull_term(query, keys, idx)
    kn = keys.detach() / keys.detach().norm(dim=1, keepdim=True)
    qn = query / query.norm(dim=1, keepdim=True)
    expected = sum(float(qn[b] @ kn[j]) for b in range(3) for j in idx[b].tolist()) / 3  # summed over N, / batch
    assert pull.item() == pytest.approx(expected, rel=1e-12)
    pull.backward()
    grad_norm = keys.grad.norm(dim=1)
    assert grad_norm[4] == 0 and all(grad_norm[j] > 0 for j in (0, 1, 2, 3))
    # gradient ascent on the pull term turns the selected keys towards their queries
    assert pull_term(query, keys.detach() + 0.01 * keys.grad, idx) > pull


def test_batchwise_majority_and_ties_prefer_lower_index():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.9, 0.8, 0.0], [0.0, 0.9, 0.1, 0.8]])
    idx = select_prompts(scores, 2, batchwise=True)
    # counts: 1 -> 3, 0 -> 1, 2 -> 1, 3 -> 1: prompt 1 first, then the lowest-index tie (0)
    assert idx.tolist() == [[1, 0]] * 3


def test_task_indexed_selection_ignores_the_scores():
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.9]])
    assert select_prompts(scores, 2, task=1).tolist() == [[2, 3], [2, 3]]
    with pytest.raises(ValueError, match="pool has 4"):
        select_prompts(scores, 2, task=2)


def test_pool_smaller_than_top_n_is_refused():
    with pytest.raises(ValueError, match="smaller than top-N"):
        PromptPool(3, 8, (2, 8), top_n=5)
    with pytest.raises(ValueError, match="smaller than top-N"):
        L2PConfig(pool_size=4, top_n=5)
    with pytest.raises(ValueError, match="top_n"):
        select_prompts(torch.zeros(2, 3), 4)


def test_pool_returns_the_selected_prompts():
    pool = PromptPool(5, 6, (2, 3), top_n=2, generator=torch.Generator().manual_seed(0))
    keys, query = _keys_and_query()
    with torch.no_grad():
        pool.keys.copy_(keys.float())
    prompts, idx, _ = pool(query.float())
    assert idx.tolist() == [[0, 1], [2, 3], [3, 1]]
    assert torch.equal(prompts[2, 0], pool.prompts[3])
    assert pool.prompts.min() >= -1 and pool.prompts.max() <= 1 and pool.prompts.min() < -0.5


def test_boundaries_of_top_n_pool_size_and_task_are_exact():
    """top_n = 1 and top_n = pool are valid, task 0 is valid, and a task whose slice just fits is valid; one past
    each bound is refused, with the slice named in the message."""
    scores = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    assert select_prompts(scores, 1).shape == (2, 1) and select_prompts(scores, 4).shape == (2, 4)
    assert select_prompts(scores, 2, task=0).tolist() == [[0, 1], [0, 1]]
    assert select_prompts(scores, 2, task=1).tolist() == [[2, 3], [2, 3]]
    with pytest.raises(ValueError, match=r"^task 2 needs prompts 4\.\.5; the pool has 4$"):
        select_prompts(scores, 2, task=2)
    with pytest.raises(ValueError, match=r"^task -1 needs prompts"):
        select_prompts(scores, 2, task=-1)
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match="top_n must be an int in"):
            select_prompts(scores, bad)
    assert PromptPool(1, 3, (2,), top_n=1).pool_size == 1
    assert PromptPool(4, 3, (2,), top_n=4).top_n == 4
    for size in (0, True, 2.0):
        with pytest.raises(ValueError, match="pool_size must be an int >= 1"):
            PromptPool(size, 3, (2,), top_n=1)
    for top_n in (0, True):
        with pytest.raises(ValueError, match="smaller than top-N"):
            PromptPool(4, 3, (2,), top_n=top_n)


def test_batchwise_majority_returns_top_n_even_when_only_low_indices_were_chosen():
    # every row picks prompts 0 and 1 of a pool of 6: the majority is [0, 1]; with top_n 2 the counts must cover
    # the whole pool so that the order is over all M prompts
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0, -0.1, -0.2]] * 3)
    assert select_prompts(scores, 2, batchwise=True).tolist() == [[0, 1]] * 3
    # ties between many equal counts keep the lower index first (a stable order), on a long pool
    scores = torch.eye(40)[1:40:2] * 2 - 1  # rows pick prompts 1, 3, 5, ... once each
    assert select_prompts(scores, 1, batchwise=True)[0].tolist() == [1]


def test_pool_initialisation_is_seeded_and_uniform_in_minus_one_one():
    a = PromptPool(64, 16, (5, 8), top_n=4, generator=torch.Generator().manual_seed(3))
    b = PromptPool(64, 16, (5, 8), top_n=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.keys, b.keys) and torch.equal(a.prompts, b.prompts)
    assert a.prompts.shape == (64, 5, 8)
    for t in (a.keys, a.prompts):
        assert -1.0 <= float(t.min()) < -0.9 and 0.9 < float(t.max()) <= 1.0 and abs(float(t.mean())) < 0.1


def test_pool_forward_passes_batchwise_and_task_on():
    pool = PromptPool(6, 4, (2,), top_n=2, batchwise=True, generator=torch.Generator().manual_seed(0))
    q = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    _, idx, pull = pool(q)
    assert torch.equal(idx, select_prompts(key_scores(q, pool.keys), 2, batchwise=True))
    assert (idx == idx[0]).all()  # batch-wise: one choice for the batch
    _, idx, pull_t = pool(q, task=2)
    assert idx.tolist() == [[4, 5]] * 5
    assert torch.allclose(pull_t, pull_term(q, pool.keys, idx))
