"""The PyTorch peer: the speed table's workloads written the way a torch user would write them.

ART, torchattacks and BackdoorBench are built on PyTorch, so torch is the tool a user would
pick instead of this harness. These are the same computations as the JAX code they are timed
beside (same weights, same data, same update rules), in idiomatic eager PyTorch on the CPU:

- `fgsm_autograd`: FGSM with `torch.autograd` (the torchattacks way); `fgsm_analytic`: the
  same gradient in matrix form (four matmuls, no autograd);
- `pgd`: PGD-L∞ with autograd, `steps` steps from a given start;
- `seed_sgd_epoch`: the study's per-sample rule, in place, one sample at a time;
- `minibatch_epoch`: one minibatch epoch of the harness's `mlp-sgd` (sigmoid MLP, mean squared
  error against the study's targets, SGD) or `mlp-ce` (ReLU MLP with biases, cross-entropy,
  Adam) recipe, with `torch.optim`.

Every function takes and returns numpy arrays (float32 or float64) so that tests compare it
with the numpy baseline and the JAX code; the timed forms (`Prepared`) keep the tensors on the
torch side between calls. torch is an optional extra (`pip install -e '.[peers]'`); importing
this module without it raises `PeerMissing`. torchattacks (the AutoAttack reference) is
installed apart, without its declared but never imported torchvision:
`pip install --no-deps torchattacks==3.5.1` (what `make bench-peers` runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError, MlshiftError
from mlshift_jax.core.study import TARGET_HIGH, TARGET_LOW

NOT_INSTALLED = "not installed"  # a speed row's note where torch is missing


class PeerMissing(MlshiftError):
    """The optional peer (torch) is not installed: `pip install -e '.[peers]'`."""


def _torch():
    # OpenMP threads that spin after each op (libgomp's default) steal the cores XLA's pool,
    # in the same process, and any other process on a shared machine need: on a loaded
    # 2-core machine a 16-image torch step took 60x longer spinning than sleeping. Passive
    # waiting, set before torch loads OpenMP; a user's own OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        raise PeerMissing("torch is not installed; install the peers extra: "
                          "pip install -e '.[peers]'") from None
    return torch


def available() -> bool:
    """Whether torch can be imported."""
    try:
        _torch()
    except PeerMissing:
        return False
    return True


def version() -> str | None:
    """torch.__version__, or None when it is not installed."""
    return _torch().__version__ if available() else None


def _targets(torch, y, n_out: int, dtype):
    t = torch.full((len(y), n_out), TARGET_LOW, dtype=dtype)
    t[torch.arange(len(y)), y] = TARGET_HIGH
    return t


def _as(torch, a):
    """A torch tensor sharing a's memory (a copy where a is read-only, e.g. from JAX)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


# --- the study's MLP: FGSM and PGD -------------------------------------------------------------


def _seed_loss(torch, wih, who, x, t):
    out = torch.sigmoid(torch.sigmoid(x @ wih.T) @ who.T)
    return 0.5 * torch.sum((t - out) ** 2)  # a sum: each example's gradient is its own


def fgsm_autograd_t(wih, who, x, y, eps: float, lo: float, hi: float):
    """FGSM on torch tensors with autograd. x: [n, D] -> [n, D]."""
    torch = _torch()
    x = x.detach().clone().requires_grad_(True)
    t = _targets(torch, y, who.shape[0], x.dtype)
    (grad,) = torch.autograd.grad(_seed_loss(torch, wih, who, x, t), x)
    return torch.clamp(x.detach() + eps * torch.sign(grad), lo, hi)


def fgsm_analytic_t(wih, who, x, y, eps: float, lo: float, hi: float):
    """FGSM on torch tensors, the gradient in matrix form (as `baseline.input_grad_batched`)."""
    torch = _torch()
    with torch.no_grad():
        t = _targets(torch, y, who.shape[0], x.dtype)
        h = torch.sigmoid(x @ wih.T)
        out = torch.sigmoid(h @ who.T)
        dz2 = (out - t) * out * (1.0 - out)
        dz1 = (dz2 @ who) * h * (1.0 - h)
        return torch.clamp(x + eps * torch.sign(dz1 @ wih), lo, hi)


def pgd_t(wih, who, x, y, eps: float, lo: float, hi: float, *, steps: int = 10,
          step_size: float | None = None, x0=None):
    """PGD-L∞ (Madry et al. 2018) on torch tensors with autograd, from x0 (default x)."""
    torch = _torch()
    step = 2.5 * eps / steps if step_size is None else step_size
    t = _targets(torch, y, who.shape[0], x.dtype)
    xa = (x if x0 is None else x0).detach().clone()
    xa = torch.clamp(torch.clamp(xa, x - eps, x + eps), lo, hi)
    for _ in range(steps):
        xa.requires_grad_(True)
        (grad,) = torch.autograd.grad(_seed_loss(torch, wih, who, xa, t), xa)
        with torch.no_grad():
            xa = xa + step * torch.sign(grad)
            xa = torch.clamp(torch.clamp(xa, x - eps, x + eps), lo, hi)
    return xa.detach()


def _numpy_call(fn, wih, who, x, y, *args, **kw) -> np.ndarray:
    torch = _torch()
    dtype = np.result_type(wih, who, x)
    tw, to, tx = (_as(torch, np.asarray(a, dtype)) for a in (wih, who, x))
    if "x0" in kw and kw["x0"] is not None:
        kw["x0"] = _as(torch, np.asarray(kw["x0"], dtype))
    return fn(tw, to, tx, _as(torch, np.asarray(y, np.int64)), *args, **kw).numpy()


def fgsm_autograd(wih, who, x, y, eps, lo=0.01, hi=1.0) -> np.ndarray:
    """FGSM with torch autograd on numpy arrays. x: [n, D], y: [n] -> [n, D]."""
    return _numpy_call(fgsm_autograd_t, wih, who, x, y, eps, lo, hi)


def fgsm_analytic(wih, who, x, y, eps, lo=0.01, hi=1.0) -> np.ndarray:
    """FGSM with the matrix-form gradient in torch on numpy arrays."""
    return _numpy_call(fgsm_analytic_t, wih, who, x, y, eps, lo, hi)


def pgd(wih, who, x, y, eps, lo=0.01, hi=1.0, *, steps=10, step_size=None,
        x0=None) -> np.ndarray:
    """PGD-L∞ with torch autograd on numpy arrays, from x0 (default: x, no random start)."""
    return _numpy_call(pgd_t, wih, who, x, y, eps, lo, hi, steps=steps, step_size=step_size,
                       x0=x0)


# --- training ----------------------------------------------------------------------------------


def seed_sgd_epoch_t(wih, who, x, t, lr: float) -> None:
    """The study's per-sample rule in place on torch tensors, one sample at a time.

    wih: [h, D], who: [K, h] (updated in place); x: [n, D]; t: [n, K] the 0.01/0.99 targets.
    """
    torch = _torch()
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi, ti = x[i], t[i]
            h = torch.sigmoid(wih @ xi)
            out = torch.sigmoid(who @ h)
            err = ti - out
            hid_err = who.T @ err
            who.add_(torch.outer(err * out * (1.0 - out), h), alpha=lr)
            wih.add_(torch.outer(hid_err * h * (1.0 - h), xi), alpha=lr)


def seed_sgd_epoch(wih, who, x, y, lr: float) -> dict[str, np.ndarray]:
    """One epoch of the study's rule in torch on numpy arrays -> {"wih", "who"} (new arrays)."""
    torch = _torch()
    dtype = np.result_type(wih, who, x)
    tw, to = _as(torch, np.array(wih, dtype)), _as(torch, np.array(who, dtype))
    tx = _as(torch, np.asarray(x, dtype))
    t = _targets(torch, _as(torch, np.asarray(y, np.int64)), to.shape[0], tx.dtype)
    seed_sgd_epoch_t(tw, to, tx, t, lr)
    return {"wih": tw.numpy(), "who": to.numpy()}


def _mlp_sgd_loss(torch, p, xb, yb):
    out = torch.sigmoid(torch.sigmoid(xb @ p["wih"].T) @ p["who"].T)
    t = _targets(torch, yb, p["who"].shape[0], xb.dtype)
    return torch.mean(0.5 * torch.sum((t - out) ** 2, dim=1))


def _mlp_ce_loss(torch, p, xb, yb):
    logits = torch.relu(xb @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
    return torch.nn.functional.cross_entropy(logits, yb)


LOSSES = {"mlp-sgd": _mlp_sgd_loss, "mlp-ce": _mlp_ce_loss}


def minibatch_epoch_t(recipe: str, params: dict, x, y, order, *, lr: float, batch_size: int,
                      optimizer: str):
    """One minibatch epoch of `recipe` ("mlp-sgd" or "mlp-ce") on torch tensors, in place.

    params: {name: leaf tensor with requires_grad}; order: [n] the shuffled sample order (the
    last n % batch_size samples dropped, as `train.train_minibatch`); optimizer: "sgd"/"adam".
    """
    torch = _torch()
    loss_fn = LOSSES[recipe]
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(params.values(), lr=lr)
    n_batches = x.shape[0] // batch_size
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        opt.zero_grad(set_to_none=True)
        loss_fn(torch, params, x[idx], y[idx]).backward()
        opt.step()
    return params


def minibatch_epoch(recipe: str, params: dict, x, y, order, *, lr: float, batch_size: int,
                    optimizer: str) -> dict[str, np.ndarray]:
    """`minibatch_epoch_t` on numpy arrays -> the trained params as numpy arrays."""
    torch = _torch()
    tp = {k: _as(torch, np.array(v)).requires_grad_(True) for k, v in params.items()}
    tx = _as(torch, np.asarray(x, np.asarray(next(iter(params.values()))).dtype))
    minibatch_epoch_t(recipe, tp, tx, _as(torch, np.asarray(y, np.int64)),
                      _as(torch, np.asarray(order, np.int64)), lr=lr, batch_size=batch_size,
                      optimizer=optimizer)
    return {k: v.detach().numpy() for k, v in tp.items()}


# --- timed forms: tensors prepared once, the call timed ----------------------------------------


class Prepared(NamedTuple):
    """A torch workload ready to time: `run()` does the work on tensors built beforehand
    (torch runs eagerly and synchronously on the CPU, so no block is needed)."""

    name: str
    run: Callable[[], Any]


def prepared_fgsm(wih, who, x, y, eps, lo, hi, *, analytic: bool) -> Prepared:
    torch = _torch()
    tw, to, tx = (_as(torch, np.asarray(a, np.float32)) for a in (wih, who, x))
    ty = _as(torch, np.asarray(y, np.int64))
    fn = fgsm_analytic_t if analytic else fgsm_autograd_t
    name = "torch: FGSM, matrix-form gradient" if analytic else "torch: FGSM, autograd"
    return Prepared(name, lambda: fn(tw, to, tx, ty, eps, lo, hi))


def prepared_pgd(wih, who, x, y, eps, lo, hi, *, steps: int) -> Prepared:
    torch = _torch()
    tw, to, tx = (_as(torch, np.asarray(a, np.float32)) for a in (wih, who, x))
    ty = _as(torch, np.asarray(y, np.int64))
    return Prepared(f"torch: PGD-{steps}, autograd",
                    lambda: pgd_t(tw, to, tx, ty, eps, lo, hi, steps=steps))


def prepared_seed_epoch(wih, who, x, y, lr: float) -> Prepared:
    torch = _torch()
    tx = _as(torch, np.asarray(x, np.float32))
    t = _targets(torch, _as(torch, np.asarray(y, np.int64)), np.shape(who)[0], tx.dtype)
    w0, o0 = np.asarray(wih, np.float32), np.asarray(who, np.float32)

    def run():
        tw, to = _as(torch, w0.copy()), _as(torch, o0.copy())
        seed_sgd_epoch_t(tw, to, tx, t, lr)
        return tw

    return Prepared("torch: the study's per-sample rule, in place, float32", run)


def prepared_minibatch(recipe: str, params: dict, x, y, order, *, lr: float, batch_size: int,
                       optimizer: str) -> Prepared:
    torch = _torch()
    tx = _as(torch, np.asarray(x, np.float32))
    ty, to = _as(torch, np.asarray(y, np.int64)), _as(torch, np.asarray(order, np.int64))
    p0 = {k: np.asarray(v, np.float32) for k, v in params.items()}

    def run():
        tp = {k: _as(torch, v.copy()).requires_grad_(True) for k, v in p0.items()}
        return minibatch_epoch_t(recipe, tp, tx, ty, to, lr=lr, batch_size=batch_size,
                                 optimizer=optimizer)

    return Prepared(f"torch: {recipe} ({optimizer}, batch {batch_size}), torch.optim", run)


def threads() -> int:
    """torch's intra-op thread count (it uses every core by default, as XLA does)."""
    return int(_torch().get_num_threads())


# --- AutoAttack: torchattacks at the reference's standard settings -----------------------------


def torchattacks_available() -> bool:
    """Whether torch (the `peers` extra) and torchattacks (`make bench-peers`) import."""
    if not available():
        return False
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        return False
    return True


def torch_model(model, params: dict, dtype=np.float32):
    """The harness's built-in `seed-mlp` or `mlp-ce` `model` (a `zoo.Model`) with weights
    `params` (cast to dtype) as an eval-mode torch Module on images [n, C, H, W]
    (torchattacks' layout, flattened in the harness's (H, W, C) order) -> [n, K] the logits
    the harness's attacks climb (`attacks.losses.logits`): mlp-ce's logits; seed-mlp's
    pre-sigmoid outputs, the logit of its sigmoid scores. The one torch port of the
    harness's models (the tests' oracles, `prepared_autoattack`,
    scripts/autoattack_agreement.py). ConfigError for another model; PeerMissing without
    torch."""
    torch = _torch()
    if model.name not in ("seed-mlp", "mlp-ce"):
        raise ConfigError(f"no torch port of {model.name!r}; expected seed-mlp or mlp-ce")
    p = {k: _as(torch, np.asarray(v, dtype)) for k, v in params.items()}

    class Net(torch.nn.Module):
        def forward(self, v):
            v = v.permute(0, 2, 3, 1).reshape(v.shape[0], -1)  # (H, W, C) flattening
            if model.name == "seed-mlp":
                return torch.sigmoid(v @ p["wih"].T) @ p["who"].T
            return torch.relu(v @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    return Net().eval()


def _images(torch, model, x, dtype=np.float32):
    h, w, c = model.input_shape
    return _as(torch, np.asarray(x, dtype)).reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous()


def ported(model, params: dict, x, y, *, atol: float = 1e-4):
    """(net, xt, yt): `torch_model(model, params)`, x: [n, D] as float32 images
    [n, C, H, W] and y: [n] as int64, after checking that the port's logits on x equal the
    harness's attack logits (`attacks.losses.logits`) to `atol`, both computed in float64
    (in float32 the logit of seed-mlp's sigmoid scores is off by up to ~2e-4 where a score
    nears 1: rounding, not the port). ConfigError where they differ (a wrong port);
    PeerMissing without torch."""
    from mlshift_jax.attacks.losses import logits

    torch = _torch()
    with torch.no_grad():
        theirs = torch_model(model, params, np.float64)(_images(torch, model, x, np.float64))
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        ours = np.asarray(jax.vmap(lambda v: logits(model, p64, v))(
            jnp.asarray(np.asarray(x, np.float64))))
    worst = float(np.max(np.abs(theirs.numpy() - ours), initial=0.0))
    if not worst <= atol:
        raise ConfigError(f"torch port of {model.name}: expected logits equal to {atol:g}, "
                          f"found a difference of {worst:.3g}")
    return torch_model(model, params), _images(torch, model, x), _as(torch, np.asarray(y, np.int64))


def reference_autoattack(net, eps: float, n_classes: int = 10):
    """torchattacks' ensemble at AutoAttack's standard settings (Croce & Hein 2020): APGD-CE
    (100 iterations), APGD-T (100 iterations, the top n_classes - 1 targets), FAB-T
    (multi-targeted, 100 steps) and Square (5,000 queries), each on the images the earlier
    ones left correctly classified (`torchattacks.MultiAttack`); torchattacks' own
    `AutoAttack` class runs 10 iterations. L∞ budget eps, box [0, 1] (torchattacks clamps
    there). net: a torch Module on [n, C, H, W] -> logits (`torch_model`)."""
    _torch()
    import torchattacks as ta

    return ta.MultiAttack([
        ta.APGD(net, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        ta.APGDT(net, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=n_classes,
                 seed=0),
        ta.FAB(net, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
               n_classes=n_classes, seed=0),
        ta.Square(net, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0)])


def prepared_autoattack(model, params: dict, x, y, eps: float) -> Prepared:
    """`reference_autoattack` on the harness's `model` (seed-mlp or mlp-ce, `torch_model`)
    with weights `params`. x: [n, D], y: [n]; run() -> adversarial images [n, C, H, W];
    run.robust(adv) -> [n] bool, the images still correctly classified."""
    torch = _torch()
    net, tx, ty = ported(model, params, x, y)
    attack = reference_autoattack(net, eps, model.n_classes)

    def run():
        return attack(tx, ty)

    def robust(adv) -> np.ndarray:
        with torch.no_grad():
            return (net(adv).argmax(1) == ty).numpy()

    run.robust = robust
    return Prepared("torchattacks: AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000)", run)
