"""Sharpness of a model with ``nn.Embedding(sparse=True)`` (issue 9, item 3: ``add(sparse, dense)`` on every try)."""

from __future__ import annotations

import pytest
import torch

from lightning_stablelr.probe import ObjectiveProbe
from lightning_stablelr.sharpness import top_hessian_eigenvalue
from tests.setups import SparseEmbedding, _indices


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_sparse_embedding_sharpness_equals_the_dense_models(method):
    batch = _indices(8, 0).tensors
    sparse = SparseEmbedding()
    dense = SparseEmbedding()
    dense.load_state_dict(sparse.state_dict())
    dense.body.sparse = False
    values = []
    for model in (sparse, dense):
        probe = ObjectiveProbe(model)
        theta = probe.parameters()
        estimate = top_hessian_eigenvalue(lambda t, probe=probe: probe.loss(batch, t, create_graph=True), theta,
                                          iters=30, method=method, generator=torch.Generator().manual_seed(0))
        values.append(estimate.value)
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert values[0] > 0
