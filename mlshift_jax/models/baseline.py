"""The numpy reference: the study's `neuralNetwork`, kept faithful to its code.

numpy only. It is the yardstick for correctness (JAX is tested against it in float64) and for
timing (the runner times it beside the JAX code in the same run).

The study's `train()` sends the raw output errors back to the hidden layer
(`hidden_errors = who.T @ output_errors`), without the output sigmoid's derivative. That is
not gradient descent on the squared error for `wih`; it is kept here exactly as written.
"""

from __future__ import annotations

import numpy as np

from mlshift_jax.core.study import TARGET_HIGH, TARGET_LOW


def sigmoid(z: np.ndarray) -> np.ndarray:
    """scipy.special.expit without scipy: 1 / (1 + exp(-z))."""
    return 1.0 / (1.0 + np.exp(-z))


class neuralNetwork:  # noqa: N801 - the study's name, kept so its code reads the same
    """The study's three-layer sigmoid network, trained one sample at a time.

    Weights are drawn as the study draws them: wih ~ Normal(0, hnodes^-0.5) [hnodes, inodes],
    who ~ Normal(0, onodes^-0.5) [onodes, hnodes]. Pass `rng` (a numpy Generator) for a seeded
    draw, or `wih`/`who` to start from given weights.
    """

    def __init__(self, inputnodes, hiddennodes, outputnodes, learningrate, *, rng=None,
                 wih=None, who=None, dtype=np.float64):
        self.inodes, self.hnodes, self.onodes = inputnodes, hiddennodes, outputnodes
        self.lr = learningrate
        rng = np.random.default_rng(0) if rng is None else rng
        if wih is None:
            wih = rng.normal(0.0, pow(self.hnodes, -0.5), (self.hnodes, self.inodes))
        if who is None:
            who = rng.normal(0.0, pow(self.onodes, -0.5), (self.onodes, self.hnodes))
        self.wih = np.array(wih, dtype=dtype)
        self.who = np.array(who, dtype=dtype)
        self.activation_function = sigmoid

    def train(self, inputs_list, targets_list) -> None:
        """One per-sample update, line for line the study's `train`."""
        inputs = np.array(inputs_list, ndmin=2, dtype=self.wih.dtype).T
        targets = np.array(targets_list, ndmin=2, dtype=self.wih.dtype).T
        hidden_outputs = self.activation_function(np.dot(self.wih, inputs))
        final_outputs = self.activation_function(np.dot(self.who, hidden_outputs))
        output_errors = targets - final_outputs
        hidden_errors = np.dot(self.who.T, output_errors)
        self.who += self.lr * np.dot(
            output_errors * final_outputs * (1.0 - final_outputs), hidden_outputs.T)
        self.wih += self.lr * np.dot(
            hidden_errors * hidden_outputs * (1.0 - hidden_outputs), inputs.T)

    def query(self, inputs_list) -> np.ndarray:
        """The study's `query`: one image [inodes] -> column of outputs [onodes, 1]."""
        inputs = np.array(inputs_list, ndmin=2, dtype=self.wih.dtype).T
        hidden_outputs = self.activation_function(np.dot(self.wih, inputs))
        return self.activation_function(np.dot(self.who, hidden_outputs))

    def query_batch(self, x: np.ndarray) -> np.ndarray:
        """Vectorised query. x: [batch, inodes] -> outputs [batch, onodes]."""
        x = np.asarray(x, dtype=self.wih.dtype)
        return sigmoid(sigmoid(x @ self.wih.T) @ self.who.T)

    def train_epoch(self, x: np.ndarray, y: np.ndarray) -> None:
        """One pass of the study's loop over x: [n, inodes] in order, labels y: [n]."""
        targets = np.full((len(y), self.onodes), TARGET_LOW, dtype=self.wih.dtype)
        targets[np.arange(len(y)), y] = TARGET_HIGH
        for inputs, t in zip(x, targets, strict=True):
            self.train(inputs, t)

    def params(self) -> dict[str, np.ndarray]:
        """The weights in the study's orientation: {'wih': [h, 784], 'who': [10, h]}."""
        return {"wih": self.wih.copy(), "who": self.who.copy()}


# --- FGSM in numpy: the study's input attack, per image and batched ----------------------------
#
# The analytic gradient of the squared error L = 0.5 * sum((t - out)^2) w.r.t. the input of
# the study's MLP, out = s(who @ h), h = s(wih @ x), s the sigmoid (s' = s * (1 - s)):
#   dL/dout = out - t
#   dL/dz2  = (out - t) * out * (1 - out)
#   dL/dh   = who.T @ dL/dz2
#   dL/dz1  = dL/dh * h * (1 - h)
#   dL/dx   = wih.T @ dL/dz1
# FGSM (Goodfellow, Shlens & Szegedy, ICLR 2015): x_adv = clip(x + eps * sign(dL/dx), lo, hi).


def _fgsm_args(wih, who, x, eps, lo, hi):
    """Common dtype of weights and inputs; eps, lo, hi in it; ConfigError for bad values."""
    from mlshift_jax.core.errors import ConfigError  # local: this file's top is the study's code

    if not (np.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps: expected a finite value >= 0, found {eps!r}")
    if not lo < hi:
        raise ConfigError(f"input range: expected lo < hi, found lo={lo} >= hi={hi}")
    dtype = np.result_type(wih, who, x)
    cast = dtype.type
    return (np.asarray(wih, dtype), np.asarray(who, dtype), np.asarray(x, dtype),
            cast(eps), cast(lo), cast(hi))


def input_grad_one(wih: np.ndarray, who: np.ndarray, inputs_list, label: int) -> np.ndarray:
    """dL/dx for one image, in the study's column-vector style. inputs_list: [784] -> [784]."""
    inputs = np.array(inputs_list, ndmin=2, dtype=wih.dtype).T
    targets = np.full((who.shape[0], 1), TARGET_LOW, dtype=wih.dtype)
    targets[label] = TARGET_HIGH
    hidden_outputs = sigmoid(np.dot(wih, inputs))
    final_outputs = sigmoid(np.dot(who, hidden_outputs))
    output_delta = (final_outputs - targets) * final_outputs * (1.0 - final_outputs)
    hidden_delta = np.dot(who.T, output_delta) * hidden_outputs * (1.0 - hidden_outputs)
    return np.dot(wih.T, hidden_delta)[:, 0]


def input_grad_batched(wih: np.ndarray, who: np.ndarray, x: np.ndarray,
                       y: np.ndarray) -> np.ndarray:
    """dL/dx for a batch in matrix form. x: [batch, 784], y: [batch] int -> [batch, 784].

    Four matmuls: forward x @ wih.T, h @ who.T; backward dz2 @ who, dz1 @ wih.
    """
    targets = np.full((len(y), who.shape[0]), TARGET_LOW, dtype=wih.dtype)
    targets[np.arange(len(y)), y] = TARGET_HIGH
    h = sigmoid(x @ wih.T)
    out = sigmoid(h @ who.T)
    dz2 = (out - targets) * out * (1.0 - out)
    dz1 = (dz2 @ who) * h * (1.0 - h)
    return dz1 @ wih


def fgsm_loop(wih, who, x, y, eps, lo=0.01, hi=1.0) -> np.ndarray:
    """FGSM one image at a time, as the study computed it. x: [n, 784], y: [n] -> [n, 784].

    Works in the common dtype of wih, who and x (float64 or float32).
    """
    wih, who, x, eps, lo, hi = _fgsm_args(wih, who, x, eps, lo, hi)
    x_adv = np.empty_like(x)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        grad = input_grad_one(wih, who, image, int(label))
        x_adv[i] = np.clip(image + eps * np.sign(grad), lo, hi)
    return x_adv


def fgsm_batched(wih, who, x, y, eps, lo=0.01, hi=1.0) -> np.ndarray:
    """FGSM for the whole batch in matrix form. x: [n, 784], y: [n] int -> [n, 784]."""
    wih, who, x, eps, lo, hi = _fgsm_args(wih, who, x, eps, lo, hi)
    grad = input_grad_batched(wih, who, x, np.asarray(y))
    return np.clip(x + eps * np.sign(grad), lo, hi)
