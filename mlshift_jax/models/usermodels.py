"""The user's own models: `pkg.module:attr` references and Python objects, as recipes.

    recipe("pkg.module:attr")  -> Recipe     import attr, then `wrap` it
    wrap(obj, name=...)        -> Recipe     any of the accepted objects below
    recipe.build(spec, cfg)    -> Model      for a dataset's Spec (input shape, classes, range)
    recipe.fit(model, cfg, x, y) -> params   x: [n, D] flat, y: int [n]

Accepted objects (ART's idea: one wrapper that declares what the tools need, Nicolae et al.,
"Adversarial Robustness Toolbox", 2018):

- an mlshift_jax `zoo.Model` record: used as it is (its own loss and probs), with the
  dataset's input shape, classes and range; its `init` gets the keywords its signature names
  among n_in, n_out, input_shape, n_classes, plus the hyper-parameters;
- a `Recipe` (build + fit, its own trainer): used as it is, its Model renamed to the ref;
- a flax.linen `Module` instance (`Net()`, not the class `Net`): `module.init(key, x)` and
  `module.apply(variables, x)` on a batch of one image [1, H, W, C]; its params are the whole
  variables dict (modules that must mutate collections while applied, e.g. BatchNorm in
  training mode, or that need a dropout rng, need their own Recipe);
- a flax nnx `Module` class or factory, called `attr(input_shape, n_classes, *, rngs)`
  (`rngs` an `nnx.Rngs`): the trainable state is its `nnx.Param`s; everything else (batch
  statistics, rng counters) stays at its value from key 0, and the module is called in eval
  mode (`module.eval()`) on [1, H, W, C];
- an equinox factory `attr(key, input_shape, n_classes) -> eqx.Module`: the module is called
  on ONE image [H, W, C] (no batch axis, as equinox layers expect; transpose to [C, H, W]
  inside it for `eqx.nn.Conv2d`); the params are its array leaves (`eqx.partition`), the
  rest (activations, sizes) is static.

For flax, nnx and equinox the params are plain nested dicts (lists where a level is a
sequence) of arrays named as in the weights file (`weights.flatten`), and the Model's
`apply(params, x: [D]) -> logits [K]` takes ONE flat example, reshapes it to input_shape and
adds / removes the batch axis. Without a `loss` (`wrap(..., loss=f)`, f(logits [K], y) ->
scalar) they train with softmax cross-entropy on the logits through `train.train_minibatch`
(optax), and confidence is the softmax's maximum. Hyper-parameters (`hparams`) are passed to
the factory as keywords (`module.clone(**hparams)` for linen) and recorded in `Model.hparams`.

flax and equinox are optional (`pip install mlshift_jax[flax]`, `[equinox]`); nothing here
imports them unless the user's object is one of theirs. Errors are one-line `ConfigError`s:
a module that is not found or fails to import, a missing attribute, an object of no accepted
type, a model that fails on one input or whose output is not [n_classes].
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.data.spec import Spec
from mlshift_jax.models.recipes import MINIBATCH, OWN_FIT, Recipe, fill
from mlshift_jax.models.train import train_minibatch
from mlshift_jax.models.weights import path_name, unflatten
from mlshift_jax.models.zoo import Model, Params

# the recipe defaults of a user model trained by the harness (Adam on the mean cross-entropy)
DEFAULTS = {"lr": 1e-3, "epochs": 5, "optimizer": "adam", "batch_size": 64}

ACCEPTED = ("an mlshift_jax Model record, a Recipe, a flax.linen Module instance, a flax nnx "
            "Module class or factory f(input_shape, n_classes, *, rngs), or an equinox "
            "factory f(key, input_shape, n_classes)")




def spec_of(ds) -> Spec:
    """The Spec of a `data.Dataset`: (image_shape, n_classes, input_range)."""
    return Spec(tuple(ds.image_shape), int(ds.n_classes), tuple(ds.input_range))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _hparams(hparams) -> tuple:
    """((name, value), ...) sorted, hashable, from a dict or pairs."""
    items = dict(hparams or {}).items()
    return tuple(sorted((str(k), _freeze(v)) for k, v in items))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _module_of(obj: Any, module: str, cls: str) -> type | None:
    """`module.cls` if that library is already imported (the user's module imported it)."""
    mod = sys.modules.get(module)
    return getattr(mod, cls, None) if mod is not None else None


# --- importing pkg.module:attr --------------------------------------------------------------


def import_ref(ref: str) -> Any:
    """The object `attr` of "pkg.module:attr" (attr may be dotted), importing the module the
    way Python does (sys.path: installed packages and PYTHONPATH). The working folder is never
    added to sys.path: a module next to a downloaded model is not imported because of where
    the command runs. ConfigError in one line otherwise.

    Only call this with a reference the user gave (an option, an argument): never with one
    read from a file."""
    mod_name, sep, attr = ref.partition(":")
    idents = mod_name.split(".") + attr.split(".")
    if not sep or not all(p.isidentifier() for p in idents):
        raise ConfigError(f"model {ref!r}: expected a built-in name or 'pkg.module:attr'")
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ConfigError(f"model {ref!r}: no module named {e.name!r} on the Python path "
                              "(install it, or add its folder to PYTHONPATH; the working "
                              "folder is not searched)") from None
        raise ConfigError(f"model {ref!r}: importing {mod_name} failed: it needs the module "
                          f"{e.name!r}, which is not installed") from None
    except Exception as e:  # noqa: BLE001 - any error in the user's module, in one line
        raise ConfigError(f"model {ref!r}: importing {mod_name} failed: {_first_line(e)}"
                          ) from None
    where = mod_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise ConfigError(f"model {ref!r}: {where} has no attribute {part!r}; it has "
                              f"{names[:12]}{' ...' if len(names) > 12 else ''}")
        obj, where = getattr(obj, part), f"{where}.{part}"
    return obj


def recipe(ref: str, hparams=None) -> Recipe:
    """The Recipe of "pkg.module:attr" (see the module docstring); cached per (ref, hparams),
    so the same ref gives the same Recipe and the same built Models."""
    return _recipe(ref, _hparams(hparams))


@functools.cache
def _recipe(ref: str, hparams: tuple) -> Recipe:
    return wrap(import_ref(ref), name=ref, hparams=hparams)


# --- wrapping an object -----------------------------------------------------------------------


class _Template(NamedTuple):
    """The leaf names and treedef of a pytree, to rebuild it from params named the same way."""

    names: tuple[str, ...]
    treedef: Any

    @classmethod
    def of(cls, tree: Any, strip_value: bool = False) -> _Template:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return cls(tuple(_name(p, strip_value) for p, _ in leaves), treedef)

    def canonical(self, tree: Any) -> Params:
        """tree's leaves as the nested dicts / lists the weights file rebuilds."""
        return unflatten(dict(zip(self.names, jax.tree.leaves(tree), strict=True)))

    def rebuild(self, params: Params, who: str) -> Any:
        flat = {path_name(p): leaf
                for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        missing = [n for n in self.names if n not in flat]
        if missing or len(flat) != len(self.names):
            extra = sorted(set(flat) - set(self.names))
            raise ConfigError(f"{who}: params do not fit the model: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
        return self.treedef.unflatten([flat[n] for n in self.names])


def _name(path: tuple, strip_value: bool) -> str:
    if strip_value and path and getattr(path[-1], "name", None) == "value":
        path = path[:-1]  # nnx: Variable(...).value
    return path_name(path)


def _with_loss(name: str, init, logits_fn, spec, hparams: tuple, loss=None) -> Model:
    """A Model of logits_fn(params, x: [D]) -> [K] with cross-entropy (or the user's loss)."""

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return logits_fn(params, x)

    if loss is None:
        def model_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
            return -jax.nn.log_softmax(logits_fn(params, x))[y]
    else:
        def model_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
            return loss(logits_fn(params, x), y)

    return Model(name, init, apply, model_loss, jax.nn.softmax,
                 input_shape=tuple(spec.input_shape), n_classes=int(spec.n_classes),
                 input_range=tuple(spec.input_range), hparams=hparams)


def _linen(module, name: str, spec, hparams: tuple, loss) -> Model:
    module = module.clone(**dict(hparams)) if hparams else module
    shape = tuple(spec.input_shape)
    x0 = jnp.zeros((1, *shape), jnp.float32)
    template = _Template.of(jax.eval_shape(module.init, jax.random.key(0), x0))

    def init(key, **_) -> Params:
        return template.canonical(module.init(key, x0))

    def logits(params, x):
        return module.apply(template.rebuild(params, name), x.reshape(1, *shape))[0]

    return _with_loss(name, init, logits, spec, hparams, loss)


def _nnx(factory, name: str, spec, hparams: tuple, loss) -> Model:
    from flax import nnx

    shape, k = tuple(spec.input_shape), int(spec.n_classes)

    def make(key):
        return factory(shape, k, rngs=nnx.Rngs(key), **dict(hparams))

    try:
        abstract = nnx.eval_shape(lambda: make(jax.random.key(0)))
    except Exception as e:  # noqa: BLE001 - the user's constructor, in one line
        raise ConfigError(f"model {name!r}: calling it as f(input_shape={shape}, n_classes={k}, "
                          f"rngs=...) failed: {_first_line(e)}") from None
    if not isinstance(abstract, nnx.Module):
        raise ConfigError(f"model {name!r}: an nnx factory must return an nnx.Module, "
                          f"found {type(abstract).__name__}")
    graphdef, pstate, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):  # batch stats, rng counters: concrete values from key 0
        _, _, rest = nnx.split(make(jax.random.key(0)), nnx.Param, ...)
    template = _Template.of(pstate, strip_value=True)

    def init(key, **_) -> Params:
        return template.canonical(nnx.split(make(key), nnx.Param, ...)[1])

    def logits(params, x):
        module = nnx.merge(graphdef, template.rebuild(params, name), rest)
        module.eval()
        return module(x.reshape(1, *shape))[0]

    return _with_loss(name, init, logits, spec, hparams, loss)


def _equinox(factory, name: str, spec, hparams: tuple, loss) -> Model:
    shape, k = tuple(spec.input_shape), int(spec.n_classes)
    try:
        import equinox as eqx
    except ImportError:
        raise ConfigError(f"model {name!r}: a factory f(key, input_shape, n_classes) is an "
                          "equinox model, and equinox is not installed "
                          "(pip install 'mlshift_jax[equinox]')") from None

    def make(key):
        return factory(key, shape, k, **dict(hparams))

    def is_leaf_array(v):
        return eqx.is_array(v) or isinstance(v, jax.ShapeDtypeStruct)

    try:
        abstract = eqx.filter_eval_shape(make, jax.random.key(0))
    except Exception as e:  # noqa: BLE001 - the user's factory, in one line
        raise ConfigError(f"model {name!r}: calling it as f(key, input_shape={shape}, "
                          f"n_classes={k}) failed: {_first_line(e)}; expected {ACCEPTED}"
                          ) from None
    if not isinstance(abstract, eqx.Module):
        raise ConfigError(f"model {name!r}: f(key, input_shape, n_classes) returned "
                          f"{type(abstract).__name__}, not an equinox Module; expected "
                          f"{ACCEPTED}")
    arrays, static = eqx.partition(abstract, is_leaf_array)
    template = _Template.of(arrays)

    def init(key, **_) -> Params:
        return template.canonical(eqx.partition(make(key), eqx.is_array)[0])

    def logits(params, x):
        return eqx.combine(template.rebuild(params, name), static)(x.reshape(shape))

    return _with_loss(name, init, logits, spec, hparams, loss)


def _record(record: Model, name: str, spec, hparams: tuple, loss) -> Model:
    if loss is not None:
        raise ConfigError(f"model {name!r}: a Model record brings its own loss; wrap(..., "
                          "loss=...) is for flax and equinox modules")
    try:
        signature = inspect.signature(record.init).parameters
    except (TypeError, ValueError):
        signature = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    offered = {"n_in": math.prod(spec.input_shape), "n_out": int(spec.n_classes),
               "input_shape": tuple(spec.input_shape), "n_classes": int(spec.n_classes)}
    given = {k: v for k, v in offered.items() if takes_all or k in signature}
    hp = dict(hparams)

    def init(key, **kw) -> Params:
        kw = {k: v for k, v in kw.items() if takes_all or k in signature}
        return record.init(key, **{**kw, **given, **hp})

    return record._replace(name=name, init=init, input_shape=tuple(spec.input_shape),
                           n_classes=int(spec.n_classes),
                           input_range=tuple(spec.input_range), hparams=hparams)


def _kind(obj: Any) -> str:
    """Which accepted type obj is: "model", "recipe", "linen", "nnx", "equinox"."""
    if isinstance(obj, Model):
        return "model"
    if isinstance(obj, tuple) and callable(getattr(obj, "build", None)) \
            and callable(getattr(obj, "fit", None)):
        return "recipe"
    linen = _module_of(obj, "flax.linen", "Module")
    if linen is not None and isinstance(obj, linen):
        return "linen"
    if linen is not None and isinstance(obj, type) and issubclass(obj, linen):
        raise ConfigError(f"expected a flax.linen Module instance ({obj.__name__}()), found "
                          f"the class {obj.__name__}")
    nnx_module = _module_of(obj, "flax.nnx", "Module")
    if nnx_module is not None:
        if isinstance(obj, type) and issubclass(obj, nnx_module):
            return "nnx"
        if isinstance(obj, nnx_module):
            raise ConfigError(f"expected an nnx Module class or factory f(input_shape, "
                              f"n_classes, *, rngs), found an instance of "
                              f"{type(obj).__name__} (pass the class)")
    eqx_module = _module_of(obj, "equinox", "Module")
    if eqx_module is not None and isinstance(obj, eqx_module):
        raise ConfigError(f"expected an equinox factory f(key, input_shape, n_classes), "
                          f"found a built {type(obj).__name__} module")
    if callable(obj) and not isinstance(obj, type):
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        return "nnx" if "rngs" in params else "equinox"
    raise ConfigError(f"expected {ACCEPTED}; found {type(obj).__name__}")


_BUILDERS = {"model": _record, "linen": _linen, "nnx": _nnx, "equinox": _equinox}


def wrap(obj: Any, *, name: str | None = None, loss: Callable | None = None,
         hparams=None, about: str | None = None) -> Recipe:
    """A Recipe for a Python object of an accepted type (see the module docstring).

    name: the model's name in records and weights metadata (default: the object's type name;
    `recipe(ref)` passes the ref); loss: loss(logits [K], y int) -> scalar for one example,
    instead of softmax cross-entropy; hparams: keywords for the factory, recorded in the
    Model. The Recipe's build is cached per Spec, so each dataset shape builds one Model.
    """
    hp = _hparams(hparams)
    name = name or getattr(obj, "__name__", None) or type(obj).__name__
    kind = _kind(obj)
    if kind == "recipe":
        return _user_recipe(obj, name)

    @functools.cache
    def _build(spec_key: tuple) -> Model:
        spec = Spec(*spec_key)
        model = _BUILDERS[kind](obj, name, spec, hp, loss)
        check_output(model)
        return model

    def build(spec, cfg=None) -> Model:
        """The Model for a dataset's Spec (cached); cfg is not used."""
        return _build(_spec_key(spec))

    about = about or f"user model {name} ({kind}), softmax cross-entropy, Adam (optax)"
    return Recipe(name=name, build=build, fit=fit, defaults=dict(DEFAULTS), about=about,
                  trainer=MINIBATCH)


def _spec_key(spec) -> tuple:
    return (tuple(int(d) for d in spec.input_shape), int(spec.n_classes),
            tuple(float(v) for v in spec.input_range))


def _user_recipe(obj, name: str) -> Recipe:
    @functools.cache
    def build(spec, cfg=None) -> Model:
        model = obj.build(spec, cfg)
        if not isinstance(model, Model):
            raise ConfigError(f"model {name!r}: its recipe's build returned "
                              f"{type(model).__name__}, expected a Model record")
        model = model._replace(name=name)
        check_output(model)
        return model

    return Recipe(name=name, build=build, fit=obj.fit,
                  defaults=dict(getattr(obj, "defaults", {}) or {}),
                  about=getattr(obj, "about", "") or f"user recipe {name}",
                  trainer=MINIBATCH if obj.fit is fit else OWN_FIT)


def check_output(model: Model) -> None:
    """ConfigError unless model.apply maps one flat input [D] to [n_classes] (eval_shape)."""
    d = math.prod(model.input_shape)
    x = jax.ShapeDtypeStruct((d,), jnp.float32)
    try:
        params = jax.eval_shape(model.init, jax.random.key(0))
        out = jax.eval_shape(model.apply, params, x)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code, in one line
        raise ConfigError(f"model {model.name!r}: fails on one input of shape "
                          f"{tuple(model.input_shape)} (flat [{d}]): {_first_line(e)}"
                          ) from None
    if getattr(out, "shape", None) != (model.n_classes,):
        found = getattr(out, "shape", type(out).__name__)
        raise ConfigError(f"model {model.name!r}: expected outputs of shape "
                          f"({model.n_classes},) per example (the dataset's classes), "
                          f"found {found}")


def fit_check(model: Model, params: Params, *, where: str) -> None:
    """DataError unless params fit `model` (one input [D] -> [n_classes]); where: the file."""
    x = jax.ShapeDtypeStruct((math.prod(model.input_shape),), jnp.float32)
    try:
        out = jax.eval_shape(model.apply, params, x)
    except Exception as e:  # noqa: BLE001 - shapes that do not fit, in one line
        raise DataError(f"{where}: the weights do not fit model {model.name!r} "
                        f"({_first_line(e)})") from None
    if getattr(out, "shape", None) != (model.n_classes,):
        raise DataError(f"{where}: expected weights giving {model.n_classes} outputs for "
                        f"{model.name!r}, found {getattr(out, 'shape', out)}")


# --- training -------------------------------------------------------------------------------


def fit(model: Model, cfg, x, y) -> Params:
    """Train a user model: Adam (or cfg.optimizer) on the mean of model.loss over minibatches
    (`train.train_minibatch`, one compiled run), from model.init(key(seed) split 0).

    x: [n, D] flat inputs, D = prod(model.input_shape); y: int [n] in 0..n_classes-1;
    cfg: a TrainConfig (None fields: DEFAULTS). ConfigError for data of another width.
    """
    cfg = fill(DEFAULTS, cfg)
    d = math.prod(model.input_shape)
    if jnp.ndim(x) != 2 or x.shape[1] != d:
        raise ConfigError(f"model {model.name!r}: expected inputs [n, {d}] (input shape "
                          f"{tuple(model.input_shape)} flattened), found {list(jnp.shape(x))}")
    key_init, key_shuffle = jax.random.split(jax.random.key(cfg.seed))
    params = model.init(key_init)
    return train_minibatch(key_shuffle, params, jnp.asarray(x), jnp.asarray(y), model=model,
                           optimizer=cfg.optimizer, lr=float(cfg.lr),
                           batch_size=int(cfg.batch_size), epochs=int(cfg.epochs))
