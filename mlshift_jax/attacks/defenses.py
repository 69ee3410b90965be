"""Defenses as models: each wraps a `models.Model` and returns a `Model`.

The study ends its input-attack part with "How to defense?": randomization, gradient
masking, denoising. Each is here as a wrapper, so the runner, the CLI, the attacks and the
detectors take a defended model like any other:

    build(name, model, *, state=None, **options) -> Model      (cached: same args, same Model)

- `randomize`: random resize (side r ~ U{ceil(min_scale*H) .. H}) + random pad back to
  H x W, then Gaussian noise of std `noise`; fresh at every call. Xie, Wang, Zhang, Ren &
  Yuille, "Mitigating Adversarial Effects Through Randomization", ICLR 2018; the noise layer
  after Liu et al., "Towards Robust Neural Networks via Random Self-ensemble", ECCV 2018.
- `quantize`: bit-depth reduction to `bits` bits per pixel (1 bit: binarize); zero gradient
  almost everywhere. Buckman, Roy, Raffel & Goodfellow, "Thermometer Encoding", ICLR 2018;
  Xu, Evans & Qi, "Feature Squeezing", NDSS 2018.
- `median`: `size` x `size` median filter per channel (edge padding); Xu et al. 2018.
- `denoise-ae`: a small denoising autoencoder in front of the model, trained in JAX on clean
  and noisy training images (`fit_denoiser`); after Liao et al., "Defense against Adversarial
  Attacks Using High-Level Representation Guided Denoiser", CVPR 2018 (pixel-guided variant).
- `adv-train`: PGD adversarial training (`adv_fit`): the architecture unchanged, the weights
  trained on PGD examples. Madry, Makelov, Schmidt, Tsipras & Vladu, ICLR 2018.

A defended model is `model._replace(name="<base>+<defense>", apply=..., loss=...,
features=..., stochastic=..., hparams=...)`: input shape, classes and input range carry
over, and the defense reads them from the model (nothing here assumes 28x28 or 784 pixels).
Its params are the base model's params (the denoiser's weights are part of the defense, so
`denoise-ae` takes them as `state`). A randomized defense is `stochastic=True`: its apply
and loss take a keyword `key` and draw fresh randomness from it; callers split one key per
example (`metrics.predict_keyed`, `_common.batch_input_grad`).

Every defended model exposes what the adaptive attacks need (`info(model)`): the undefended
base model, and the preprocessing `pre(x: [D], key) -> [D]` on one flat example, so BPDA
(`adaptive.bpda_pgd`) can replace it by the identity on the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlshift_jax.attacks._common import pgd_kernel
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.files import tree_digest
from mlshift_jax.models.zoo import Model, Params

Preprocess = Callable[[jax.Array, Any], jax.Array]  # pre(x: [D], key or None) -> [D]


class Defended(NamedTuple):
    """What the adaptive attacks need to know of a defended model.

    defense: its name; base: the model it wraps (undefended); pre: the preprocessing on one
    flat example, pre(x: [D], key) -> [D], None for a defense in the weights (adv-train);
    pre_stochastic: pre draws randomness; options: ((name, value), ...).
    """

    defense: str
    base: Model
    pre: Preprocess | None
    pre_stochastic: bool
    options: tuple


_INFO: dict[Model, Defended] = {}
_BUILT: dict[tuple, Model] = {}


def kth_smallest(values: list[jax.Array], k: int) -> jax.Array:
    """The k-th smallest (0-based), elementwise, of a few same-shape arrays: a bubble-sort
    network of minimum/maximum pairs (exact, like a sort; fuses into elementwise code)."""
    v = list(values)
    for i in range(k + 1):  # after pass i, v[i] holds the i-th smallest
        for j in range(len(v) - 1, i, -1):
            v[j - 1], v[j] = jnp.minimum(v[j - 1], v[j]), jnp.maximum(v[j - 1], v[j])
    return v[k]


def _med3(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))


def window_median(padded: jax.Array, size: int, h: int, w: int) -> jax.Array:
    """The median of every size x size window of `padded`: [h + size - 1, w + size - 1, c]
    -> [h, w, c] (the upper middle value for an even size).

    Elementwise min/max networks over shifted views, so XLA fuses them (a per-pixel
    `jnp.sort` took over 10 minutes in the bench's median cell). For 3 x 3, each vertical
    triple is sorted once and shared by the three windows it lies in; the median is then
    med3(max of the lows, med3 of the middles, min of the highs), the classic column-sorting
    median network: about 18 min/max per pixel instead of the 60 of a selection network over
    9, and its gradient 5x cheaper (measured on 500 MNIST images, 2 cores). Other sizes:
    `kth_smallest`. Exact, as `scipy.ndimage.median_filter` (tests/test_defenses.py).
    """
    if size != 3:
        windows = [padded[i:i + h, j:j + w] for i in range(size) for j in range(size)]
        return kth_smallest(windows, size * size // 2)
    a, b, c = padded[0:h], padded[1:h + 1], padded[2:h + 2]  # [h, w + 2, c] each
    lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
    mid, hi = jnp.minimum(hi, c), jnp.maximum(hi, c)
    lo, mid = jnp.minimum(lo, mid), jnp.maximum(lo, mid)  # lo <= mid <= hi per column
    cols = [slice(j, j + w) for j in range(3)]
    max_lo = jnp.maximum(jnp.maximum(lo[:, cols[0]], lo[:, cols[1]]), lo[:, cols[2]])
    min_hi = jnp.minimum(jnp.minimum(hi[:, cols[0]], hi[:, cols[1]]), hi[:, cols[2]])
    return _med3(max_lo, _med3(*(mid[:, s] for s in cols)), min_hi)


def info(model: Model) -> Defended | None:
    """The defense record of a model `build` or `preprocessed` made; None for any other."""
    try:
        return _INFO.get(model)
    except TypeError:  # an unhashable field: not one of ours
        return None


def base_of(model: Model) -> Model:
    """The undefended model under any stack of defenses (the model itself if undefended)."""
    while (d := info(model)) is not None:
        model = d.base
    return model


def _image(model: Model, x: jax.Array) -> jax.Array:
    return x.reshape(model.input_shape)


def _split(key, pre_stochastic: bool, base_stochastic: bool):
    """(key for pre, key for the base model); None where that part draws nothing."""
    if pre_stochastic and base_stochastic:
        k1, k2 = jax.random.split(key)
        return k1, k2
    return (key if pre_stochastic else None), (key if base_stochastic else None)


def preprocessed(model: Model, pre: Preprocess, *, defense: str, stochastic: bool = False,
                 options: tuple = ()) -> Model:
    """`model` behind the preprocessing `pre` (one flat example, pre(x: [D], key) -> [D]).

    The returned Model is named "<model>+<defense>", keeps the input shape, classes and range,
    and is stochastic when pre or the model draws randomness (apply/loss then need `key=`;
    ConfigError at trace time without one). Register-free: any function works (tests plant
    masked models this way). Not cached: call it once per (model, pre).
    """
    is_stochastic = bool(stochastic or model.stochastic)

    def run(fn, params, x, *rest, key=None):
        if is_stochastic and key is None:
            raise ConfigError(f"{model.name}+{defense}: stochastic model; expected a "
                              "jax.random key (key=...), found None")
        k_pre, k_base = _split(key, stochastic, model.stochastic)
        xp = pre(x, k_pre)
        return fn(params, xp, *rest, **({"key": k_base} if model.stochastic else {}))

    def apply(params, x, *, key=None):
        return run(model.apply, params, x, key=key)

    def loss(params, x, y, *, key=None):
        return run(model.loss, params, x, y, key=key)

    features = None
    if model.features is not None:
        def features(params, x, *, key=None):
            return run(model.features, params, x, key=key)

    wrapped = model._replace(name=f"{model.name}+{defense}", apply=apply, loss=loss,
                             features=features, stochastic=is_stochastic,
                             hparams=tuple(model.hparams) + (("defense", defense),) + options)
    _INFO[wrapped] = Defended(defense, model, pre, bool(stochastic), options)
    return wrapped


# --- the preprocessors (one flat example) ------------------------------------------------------


def _resize_matrix(n: int, side, offset, dtype) -> jax.Array:
    """[n, n] linear-interpolation matrix that shrinks a length-n axis to `side` pixels
    placed at `offset` (rows outside [offset, offset + side) are 0: the padding)."""
    out = jnp.arange(n, dtype=dtype)[:, None]
    src = (out - offset + 0.5) * (n / side) - 0.5  # the input coordinate each output samples
    weight = jnp.maximum(0.0, 1.0 - jnp.abs(src - jnp.arange(n, dtype=dtype)[None, :]))
    inside = (out >= offset) & (out < offset + side)
    return jnp.where(inside, weight, 0.0)


def _randomize_pre(model: Model, min_scale: float, noise: float) -> Preprocess:
    """Random resize to side r ~ U{ceil(min_scale * H) .. H} (the width scaled alike,
    bilinear), placed at random integer offsets, padded with the range's low value; then
    N(0, noise^2) per pixel and a clip to the input range (Xie et al. 2018; Liu et al. 2018).
    Both resizes are [H, H] / [W, W] matrices, so the whole step is two small matmuls."""
    h, w, _ = model.input_shape
    lo, hi = model.input_range
    r_min = max(1, int(np.ceil(min_scale * h)))

    def pre(x, key):
        k_draw, k_noise = jax.random.split(key)
        u = jax.random.uniform(k_draw, (3,), x.dtype)  # (uniform integers from floats:
        img = _image(model, x) - lo                     # randint's traced bounds compile slowly)
        side = jnp.minimum(r_min + jnp.floor(u[0] * (h - r_min + 1)), h)
        width = jnp.clip(jnp.round(side * w / h), 1, w)
        top = jnp.minimum(jnp.floor(u[1] * (h - side + 1)), h - side)
        left = jnp.minimum(jnp.floor(u[2] * (w - width + 1)), w - width)
        a_h = _resize_matrix(h, side, top, x.dtype)
        a_w = _resize_matrix(w, width, left, x.dtype)
        out = jnp.einsum("ij,jkc,lk->ilc", a_h, img, a_w).reshape(-1) + lo
        if noise > 0:
            out = out + noise * jax.random.normal(k_noise, out.shape, out.dtype)
        return jnp.clip(out, lo, hi)

    return pre


def _quantize_pre(model: Model, bits: int) -> Preprocess:
    """Bit-depth reduction: (2^bits) levels evenly over the input range; round() has zero
    gradient, so the defended model's input gradient is 0 almost everywhere."""
    lo, hi = model.input_range
    levels = 2**bits - 1

    def pre(x, key=None):
        u = jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)
        return lo + jnp.round(u * levels) / levels * (hi - lo)

    return pre


def _median_pre(model: Model, size: int) -> Preprocess:
    """size x size median over each channel, edge padding (size odd)."""
    h, w, _ = model.input_shape
    r = size // 2

    def pre(x, key=None):
        img = jnp.pad(_image(model, x), ((r, r), (r, r), (0, 0)), mode="edge")
        return window_median(img, size, h, w).reshape(-1)

    return pre


# --- the denoising autoencoder -----------------------------------------------------------------


def dae_init(key, n_in: int, n_hidden: int = 256, dtype=jnp.float32) -> Params:
    """A one-hidden-layer autoencoder D -> n_hidden -> D (He-normal, zero biases)."""
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (n_hidden, n_in), dtype) * (2.0 / n_in) ** 0.5,
            "b1": jnp.zeros((n_hidden,), dtype),
            "w2": jax.random.normal(k2, (n_in, n_hidden), dtype) * (1.0 / n_hidden) ** 0.5,
            "b2": jnp.zeros((n_in,), dtype)}


def dae_apply(dae: Params, x: jax.Array, lo: float, hi: float) -> jax.Array:
    """The denoised image, in the input range. x: [D] -> [D]."""
    u = (x - lo) / (hi - lo)
    h = jax.nn.relu(dae["w1"] @ u + dae["b1"])
    return lo + (hi - lo) * jax.nn.sigmoid(dae["w2"] @ h + dae["b2"])


@functools.partial(jax.jit, static_argnames=("steps", "batch_size", "n_hidden", "lo", "hi"))
def _fit_dae(key, x, *, steps, batch_size, n_hidden, lo, hi, noise):
    k_init, k_run = jax.random.split(key)
    dae = dae_init(k_init, x.shape[1], n_hidden, x.dtype)
    opt = optax.adam(1e-3)

    def loss(p, xb, k):
        k_g, k_s, k_e, k_m = jax.random.split(k, 4)
        n = xb.shape[0]
        eps = jax.random.uniform(k_e, (n, 1), xb.dtype, 0.0, noise)
        gauss = xb + eps * jax.random.normal(k_g, xb.shape, xb.dtype)
        sign = xb + eps * jax.random.rademacher(k_s, xb.shape, xb.dtype)
        which = jax.random.randint(k_m, (n, 1), 0, 3)  # clean, Gaussian, random sign
        noisy = jnp.clip(jnp.where(which == 0, xb, jnp.where(which == 1, gauss, sign)), lo, hi)
        out = jax.vmap(dae_apply, in_axes=(None, 0, None, None))(p, noisy, lo, hi)
        return jnp.mean(jnp.sum((out - xb) ** 2, axis=-1))

    # epochs of shuffled batches, drawn up front: one permutation per epoch (a
    # `random.choice` without replacement per step permuted all n images 2,000 times, 32 ms
    # each on full MNIST: the whole of the fit's 63 s)
    k_order, k_noise = jax.random.split(k_run)
    per_epoch = x.shape[0] // batch_size
    epochs = -(-steps // per_epoch)
    order = jax.vmap(lambda k: jax.random.permutation(k, x.shape[0])[:per_epoch * batch_size])(
        jax.random.split(k_order, epochs)).reshape(-1, batch_size)[:steps]

    def step(carry, item):
        p, s = carry
        i, idx = item
        grads = jax.grad(loss)(p, x[idx], jax.random.fold_in(k_noise, i))
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (dae, _), _ = jax.lax.scan(step, (dae, opt.init(dae)), (jnp.arange(steps), order))
    return dae


def fit_denoiser(key: jax.Array, model: Model, x: Any, *, steps: int = 2000,
                 batch_size: int = 128, n_hidden: int = 256, noise: float = 0.3) -> Params:
    """Train the denoising autoencoder on x: [n, D] (clean training images of `model`'s data).

    Each batch mixes clean images, images with Gaussian noise and images with random-sign
    noise, each image with its own strength ~ U[0, noise]; the loss is the squared error to
    the clean image (Liao et al. 2018, pixel-guided). Adam 1e-3, `steps` batches of
    `batch_size`, each epoch a fresh shuffle of x. Returns {"w1": [h, D], "b1", "w2": [D, h], "b2"}.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[1] != int(np.prod(model.input_shape)):
        d = int(np.prod(model.input_shape))
        raise ConfigError(f"fit_denoiser: expected x of shape [n, {d}] for {model.name}, "
                          f"found {tuple(x.shape)}")
    if x.shape[0] < batch_size:
        raise ConfigError(f"fit_denoiser: expected at least batch_size={batch_size} images, "
                          f"found {x.shape[0]}")
    lo, hi = (float(v) for v in model.input_range)
    return _fit_dae(key, x, steps=int(steps), batch_size=batch_size, n_hidden=int(n_hidden),
                    lo=lo, hi=hi, noise=float(noise))


def _denoise_pre(model: Model, dae: Params) -> Preprocess:
    lo, hi = (float(v) for v in model.input_range)

    def pre(x, key=None):
        return dae_apply(dae, x, lo, hi)

    return pre


# --- adversarial training ----------------------------------------------------------------------


class PGDPerturb(NamedTuple):
    """The batch perturbation of PGD adversarial training (Madry et al. 2018): a hashable
    callable (static under jit) for `train.train_minibatch(perturb=...)`.

    __call__(params, xb: [b, D], yb: [b], key, progress=1.0) -> PGD examples, `steps` steps
    of size 2.5 * eps / steps from a random start, clipped to [lo, hi]. warmup: the share of
    training over which eps ramps linearly up from 0 (0: the full eps from the start; a
    ramp helps large eps, as in Gowal et al. 2018's IBP schedule).
    """

    model: Model
    eps: float
    steps: int
    lo: float
    hi: float
    warmup: float = 0.0

    def __call__(self, params, xb, yb, key, progress=1.0):
        dt = xb.dtype
        eps = jnp.asarray(self.eps, dt)
        if self.warmup > 0:
            eps = eps * jnp.minimum(1.0, jnp.asarray(progress, dt) / self.warmup)
        return pgd_kernel(self.model, False, self.steps, True, params, xb, yb,
                                   eps, None, key,
                                   jnp.asarray(self.lo, dt), jnp.asarray(self.hi, dt),
                                   "train")  # Madry et al.: the inner max of the training loss


@functools.partial(jax.jit, static_argnames=("epochs", "steps", "eps", "lo", "hi"))
def train_seed_sgd_adversarial(key: jax.Array, params: Params, x: jax.Array, y: jax.Array, *,
                               lr, epochs: int, eps: float, steps: int, lo: float,
                               hi: float) -> Params:
    """The study's per-sample rule (`train.seed_sgd_step`) on PGD examples: each sample is
    replaced by PGD-`steps` at eps against the current weights before its update (Madry et
    al. 2018 applied to the study's MLP, in file order). x: [n, D], y: [n]. One scan."""
    from mlshift_jax.models.train import seed_sgd_step
    from mlshift_jax.models.zoo import SEED_MLP, study_targets

    perturb = PGDPerturb(SEED_MLP, eps, steps, lo, hi)
    n_out = params["who"].shape[0]

    def one_sample(p, item):
        xi, yi, i = item
        xa = jax.lax.stop_gradient(perturb(p, xi[None], yi[None], jax.random.fold_in(key, i)))
        return seed_sgd_step(p, xa[0], study_targets(yi, n_out, xi.dtype), lr), None

    def one_epoch(p, e):
        idx = jnp.arange(x.shape[0]) + e * x.shape[0]
        return jax.lax.scan(one_sample, p, (x, y, idx))[0], None

    return jax.lax.scan(one_epoch, params, jnp.arange(epochs))[0]


ADV_EPS = 0.1  # Madry et al. train at the eps they test; the target is eps 0.1
ADV_STEPS = 7  # PGD-7 during training (the prototype's setting)
ADV_EPOCH_FACTOR = 2  # adversarial training takes twice the recipe's default epochs


def adv_fit(recipe_name: str, cfg: Any, x: Any, y: Any, *, eps: float = ADV_EPS,
            steps: int = ADV_STEPS, warmup: float = 0.0, spec: Any = None) -> Params:
    """Train recipe `recipe_name` adversarially: PGD-`steps` at `eps` on every batch.

    Works for every minibatch recipe (its trainer `train.train_minibatch` with
    `perturb=PGDPerturb(...)`, the recipe's optimizer, rate, batch size and epochs) and for
    the study's per-sample rule (`seed-mlp`; `seed-mlp-numpy` trains as `seed-mlp` here).
    warmup (minibatch recipes): the share of training over which eps ramps up from 0. On
    full MNIST the cnn recipe at eps 0.3 (4 epochs, PGD-7) collapsed to one class without it
    (accuracy 0.1135) and reached clean 0.9756 / PGD-40 0.8394 with warmup=0.5.
    cfg: a `recipes.TrainConfig` (None fields take the recipe's defaults). x: [n, D], y: [n].
    Epochs left None take `ADV_EPOCH_FACTOR` (2) times the recipe's default: measured on
    full MNIST, mlp-ce at eps 0.1 reached clean 0.906 / PGD-40 0.711 after 5 epochs and
    0.974 / 0.854 after 10. spec: the data's `models.Spec` (input shape, classes, range; a
    Dataset's `.spec`), guessed from x and y when None (`models.guess_spec`); PGD clips to its
    input range. Madry et al., ICLR 2018.
    """
    from mlshift_jax.models.recipes import resolve
    from mlshift_jax.models.registry import get_recipe
    from mlshift_jax.models.train import train_minibatch
    from mlshift_jax.models.zoo import guess_spec

    if not (isinstance(eps, (int, float)) and np.isfinite(eps) and eps > 0):
        raise ConfigError(f"adv-train: expected eps > 0, found {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"adv-train: expected steps >= 1, found {steps!r}")
    if not (isinstance(warmup, (int, float)) and 0.0 <= warmup <= 1.0):
        raise ConfigError(f"adv-train: expected warmup in [0, 1], found {warmup!r}")
    recipe = get_recipe(recipe_name)
    if cfg.epochs is None:
        cfg = replace(cfg, epochs=ADV_EPOCH_FACTOR * int(recipe.defaults["epochs"]))
    cfg = resolve(recipe, cfg)
    arch = recipe.build(guess_spec(x, y) if spec is None else spec, cfg)
    lo, hi = (float(v) for v in arch.input_range)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    key_init, key_run = jax.random.split(jax.random.key(cfg.seed))
    if cfg.batch_size is None:  # the study's per-sample rule
        params = arch.init(key_init)
        return train_seed_sgd_adversarial(key_run, params, x, y, lr=cfg.lr, epochs=cfg.epochs,
                                          eps=float(eps), steps=int(steps), lo=lo, hi=hi)
    params = arch.init(key_init)
    return train_minibatch(key_run, params, x, y, model=arch, optimizer=cfg.optimizer,
                           lr=float(cfg.lr), batch_size=cfg.batch_size, epochs=cfg.epochs,
                           perturb=PGDPerturb(arch, float(eps), int(steps), lo, hi,
                                              float(warmup)))


# --- the registry ------------------------------------------------------------------------------


def _check_randomize(o: dict) -> None:
    if not 0 < o["min_scale"] <= 1:
        raise ConfigError(f"randomize: min_scale expected in (0, 1], found {o['min_scale']}")


def _check_quantize(o: dict) -> None:
    if int(o["bits"]) != o["bits"] or not 1 <= o["bits"] <= 16:
        raise ConfigError(f"quantize: bits expected an integer in [1, 16], found {o['bits']}")


def _check_median(o: dict) -> None:
    if int(o["size"]) != o["size"] or o["size"] % 2 == 0:
        raise ConfigError(f"median: size expected an odd integer, found {o['size']}")


def _fit_denoise(key: jax.Array, model: Model, x: Any, o: dict) -> Params:
    return fit_denoiser(key, model, x, steps=int(o["steps"]), n_hidden=int(o["hidden"]),
                        noise=float(o["noise"]))


def _no_check(o: dict) -> None:
    """Options that need no check beyond "a number >= 0"."""


class Defense(NamedTuple):
    """A registered defense: what it is and how it is built, checked and fitted.

    name; kind: "preprocess" (wraps any trained model) or "training" (changes the weights:
    train with `adv_fit`; the model is renamed, its functions unchanged); defaults: its
    options and their default values; needs_state: it takes a fitted `state` (the
    denoiser's weights); adaptive: the attack that adapts to it (the table's "adaptive"
    column); about: one line with its paper.
    make_pre(model, options: dict, state) -> pre(x: [D], key) -> [D], the preprocessing on
    one flat example; None where the defense touches no input ("none", a training defense).
    pre_stochastic: pre draws fresh randomness at every call (the model becomes stochastic).
    check(options: dict): ConfigError for a value outside the option's own range (every
    option is first checked to be a number >= 0).
    fit(key, model, x: [n, D], options: dict) -> state, for a defense that needs_state; it
    reads the model's input shape and range, never trained weights, so one state serves every
    model of the same data, shape and range (the bench fits it once per run).
    """

    name: str
    kind: str
    defaults: tuple
    needs_state: bool
    adaptive: str
    about: str
    make_pre: Callable[[Model, dict, Any], Preprocess] | None = None
    pre_stochastic: bool = False
    check: Callable[[dict], None] = _no_check
    fit: Callable[[jax.Array, Model, Any, dict], Any] | None = None


DEFENSES: dict[str, Defense] = {d.name: d for d in (
    Defense("none", "preprocess", (), False, "eot-pgd", "the undefended model"),
    Defense("randomize", "preprocess", (("min_scale", 0.9), ("noise", 0.05)), False, "eot-pgd",
            "random resize + pad (Xie et al. 2018) and a Gaussian noise layer, fresh per call",
            make_pre=lambda m, o, state: _randomize_pre(m, float(o["min_scale"]),
                                                        float(o["noise"])),
            pre_stochastic=True, check=_check_randomize),
    Defense("quantize", "preprocess", (("bits", 1),), False, "bpda-pgd",
            "bit-depth reduction (Buckman et al. 2018; Xu et al. 2018): zero gradient",
            make_pre=lambda m, o, state: _quantize_pre(m, int(o["bits"])),
            check=_check_quantize),
    Defense("median", "preprocess", (("size", 3),), False, "eot-pgd",
            "median filter (spatial smoothing, Xu et al. 2018)",
            make_pre=lambda m, o, state: _median_pre(m, int(o["size"])), check=_check_median),
    Defense("denoise-ae", "preprocess", (("hidden", 256), ("steps", 2000), ("noise", 0.3)),
            True, "eot-pgd",
            "denoising autoencoder trained on clean + noisy images (after Liao et al. 2018)",
            make_pre=lambda m, o, state: _denoise_pre(m, jax.tree.map(jnp.asarray, state)),
            fit=_fit_denoise),
    Defense("adv-train", "training", (("eps", ADV_EPS), ("steps", ADV_STEPS), ("warmup", 0.0)),
            False,
            "eot-pgd", "PGD adversarial training (Madry et al. 2018)"),
)}


def get_defense(name: str) -> Defense:
    """The registered defense `name`; ConfigError naming the known ones otherwise."""
    try:
        return DEFENSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown defense {name!r}; expected one of {sorted(DEFENSES)}") from None


def resolve_options(name: str, options: dict | None = None) -> tuple:
    """The defense's options with its defaults filled in, checked: ((key, value), ...)."""
    d = get_defense(name)
    defaults = dict(d.defaults)
    options = dict(options or {})
    for key in options:
        if key not in defaults:
            raise ConfigError(f"defense {name}: unknown option {key!r}; expected one of "
                              f"{sorted(defaults)}")
    out = {**defaults, **options}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"defense {name}: option {key} expected a number >= 0, "
                              f"found {value!r}")
    d.check(out)
    return tuple(sorted(out.items()))


def build(name: str, model: Model, *, state: Any = None, **options) -> Model:
    """`model` behind defense `name` (see the module table); cached, so the same arguments
    give the same Model (jit then reuses its compiled code).

    state: the denoiser's weights for `denoise-ae` (`fit_denoiser`); ConfigError when a
    defense that needs it gets none. A defense with no preprocessing returns the model
    itself ("none") or, for a training defense (`adv-train`), the architecture renamed (its
    robustness is in the weights: train them with `adv_fit`).
    """
    d = get_defense(name)
    opts = resolve_options(name, options)
    if d.needs_state and state is None:
        raise ConfigError(f"defense {name}: expected its fitted state (state=fit_denoiser(...)),"
                          " found None")
    if d.make_pre is None and d.kind != "training":
        return model
    key = (name, model, opts, None if state is None else tree_digest(state))
    if key in _BUILT:
        return _BUILT[key]
    if d.make_pre is not None:
        wrapped = preprocessed(model, d.make_pre(model, dict(opts), state), defense=name,
                               stochastic=d.pre_stochastic, options=opts)
    else:  # same functions, new name; the weights carry the defense
        wrapped = model._replace(name=f"{model.name}+{name}",
                                 hparams=tuple(model.hparams) + (("defense", name),) + opts)
        _INFO[wrapped] = Defended(name, model, None, False, opts)
    _BUILT[key] = wrapped
    return wrapped


def fit_state(name: str, model: Model, x: Any, *, key: jax.Array, **options) -> Any:
    """The fitted state defense `name` needs (the denoiser's weights for `denoise-ae`,
    trained on x: [n, D] with the defense's options); None for the others."""
    opts = dict(resolve_options(name, options))
    d = get_defense(name)
    return None if d.fit is None else d.fit(key, model, x, opts)
