"""The mlp-ce ported to torch, for the tests that hold an attack against its torchattacks
reference on the same weights."""

from __future__ import annotations

import numpy as np

from mlshift_jax.models.zoo import predict


def torch_mlp_ce(model, params, x, y):
    """(net, xt, yt): `params` of the mlp-ce `model` as a torch module taking [n, 1, 28, 28],
    x: [n, 784] and y: [n] as torch tensors; the logits are checked equal to 1e-4 first.
    Needs torch (the `peers` extra)."""
    import torch

    p = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}

    class Net(torch.nn.Module):
        def forward(self, v):
            v = v.reshape(v.shape[0], -1)
            return torch.relu(v @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    net = Net().eval()
    xt = torch.tensor(np.asarray(x)).reshape(-1, 1, 28, 28)
    yt = torch.tensor(np.asarray(y), dtype=torch.long)
    np.testing.assert_allclose(net(xt).detach().numpy(), predict(model, params, np.asarray(x)),
                               atol=1e-4)
    return net, xt, yt
