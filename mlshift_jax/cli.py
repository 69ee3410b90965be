"""Command line: `python -m mlshift_jax <command>` (also installed as `mlshift`).

Every error the harness raises on purpose (MlshiftError) and every bad argument prints one
line to stderr and exits 2; no traceback. Ctrl-C prints one line and exits 130. Every number
is checked by its one rule (`rules.py`) before any data loads; options a command would ignore
are refused. `--format json` is strict JSON: a NaN or inf becomes null and is named in
"non_finite".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import stat
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
from tabulate import tabulate

from mlshift_jax import __version__, api
from mlshift_jax.attacks import ATTACKS, DEFENSES, attack_key, get_attack, get_defense
from mlshift_jax.attacks.defenses import ADV_EPOCH_FACTOR
from mlshift_jax.attacks.losses import LOSSES
from mlshift_jax.core import compile_cache, outdir, rules
from mlshift_jax.core.errors import ConfigError, Interrupted, MlshiftError
from mlshift_jax.core.files import atomic_path, clean_stale_temps, file_kind
from mlshift_jax.core.sharding import describe_devices, initialize_distributed
from mlshift_jax.data import datasets
from mlshift_jax.detection import FINGERPRINT, of_unit
from mlshift_jax.models import RECIPES, TrainConfig, infer_model, load_model, weights
from mlshift_jax.models.population import poison_key
from mlshift_jax.models.train import OPTIMIZERS
from mlshift_jax.poisoning.poison import MODES, POISONINGS, check_for, eligible_classes
from mlshift_jax.poisoning.poison import apply as apply_poison

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TRAIN_OPTIONS = ("model", "hidden", "lr", "epochs", "batch_size", "optimizer", "seed",
                 "train_size", "save")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message: str):  # noqa: D102
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise ConfigError(f"{command}: {message}" if command else message)


class _Help(argparse.HelpFormatter):
    """--help lists each option's default after its help (unit and choices are in the help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default is not None
                and action.default is not argparse.SUPPRESS and action.nargs != 0):
            shown = (" ".join(map(str, action.default)) if isinstance(action.default, list)
                     else action.default)
            text += f" (default: {shown})"
        return text


def _strict(value, path: str, bad: list):
    """value with every NaN / inf float replaced by None; their paths appended to `bad`."""
    if isinstance(value, dict):
        return {k: _strict(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(path)
        return None
    return value


def strict_json(payload) -> str:
    """payload as strict JSON: NaN / inf -> null, and a "non_finite" list of where they were
    (on the payload, or on each row of a list of rows)."""
    if isinstance(payload, list):
        rows = []
        for row in payload:
            bad: list = []
            row = _strict(row, "", bad)
            rows.append({**row, "non_finite": bad} if isinstance(row, dict) else row)
        out = rows
    else:
        bad = []
        out = _strict(payload, "", bad)
        if isinstance(out, dict):
            out["non_finite"] = bad
    return json.dumps(out, indent=2, default=float, allow_nan=False)


def _emit(fmt: str, payload, table_rows=None, headers="keys") -> None:
    if fmt == "json":
        print(strict_json(payload))
    elif table_rows is not None:  # rows mix text and numbers: format the floats here
        print(tabulate([[_cell(v) for v in row] for row in table_rows], headers=headers,
                       disable_numparse=True))
    else:
        print(tabulate(payload, headers=headers, floatfmt=".4f"))


def _given(result: dict) -> list[list]:
    """A result's (key, value) rows for a text table, without the keys it has no value for
    (null in the JSON, whose shape is one per command)."""
    return [[k, v] for k, v in result.items() if v is not None]


def _log(line: str) -> None:
    """A progress line on stderr, as every mlshift line: `mlshift: ...`."""
    print(f"mlshift: {line}", file=sys.stderr)


def _cell(v):
    """A float for a text table: 4 significant digits below 1, 6 up to a million, else
    scientific (0.9255000352859497 -> 0.9255, 0.000228 -> 2.289e-04); anything else as is."""
    if not isinstance(v, (float, np.floating)):
        return v
    v = float(v)
    if not math.isfinite(v) or v == 0:
        return str(v)
    if 1e-3 <= abs(v) < 1:
        return f"{v:.4g}"
    return f"{v:.6g}" if 1 <= abs(v) < 1e6 else f"{v:.3e}"


def _dataset_of(meta: dict) -> str | None:
    """The dataset a weights file's metadata names, as `--dataset` takes it: a built-in name,
    or the path of the .npz / IDX folder / CSV folder it was read from (None: none usable)."""
    found = meta.get("dataset") or {}
    name, source = found.get("name"), str(found.get("source") or "")
    if name in datasets.DATASETS:
        return name
    kind, _, where = source.partition(":")
    if kind == "csv":
        where = str(Path(where).parent)
    if kind in ("npz", "idx", "csv") and Path(where).exists():
        return where
    return None


def _load(args, meta: dict | None = None, scale=None) -> datasets.Dataset:
    """The dataset the arguments name (without --dataset: the one the weights' metadata
    `meta` names, else mnist), a path's images scaled to `scale` (None: 0..1); then one
    stderr line saying where the work runs."""
    if args.dataset is None:
        args.dataset = _dataset_of(meta or {}) or "mnist"
        if meta and args.dataset != "mnist":
            print(f"mlshift: dataset {args.dataset} (from the weights' metadata)",
                  file=sys.stderr)
    ds = datasets.load(args.dataset, args.data_dir, scale=scale)
    print(f"mlshift: {ds.name} from {ds.source}; {describe_devices()}", file=sys.stderr)
    return ds


def _train_data(args, ds: datasets.Dataset):
    """The first --train-size training images (all without it); more than there are is an
    error, the same rule in every command."""
    n = rules.check_at_most(args.train_size, len(ds.y_train), "--train-size",
                            f"training images of {ds.name}")
    return ds.x_train[:n], ds.y_train[:n]


def _train_split(args, ds: datasets.Dataset) -> datasets.Dataset:
    """ds with its training split cut to the first --train-size images (`_train_data`)."""
    x, y = _train_data(args, ds)
    return replace(ds, x_train=x, y_train=y)


def _train_config(args) -> TrainConfig:
    return TrainConfig(hidden=args.hidden, lr=args.lr, epochs=args.epochs,
                       batch_size=args.batch_size, optimizer=args.optimizer, seed=args.seed)


def _check_recipe(args) -> TrainConfig:
    """The TrainConfig --model trains with (its recipe's defaults filled): checked before
    the data loads."""
    return api.train_config(args.model, _train_config(args))


def _check_train_memory(x: np.ndarray, hidden: int, what: str) -> None:
    """Refuse a training run whose inputs (host and device copies, float32) and weights
    (with optimizer state) would not fit."""
    n, d = x.shape
    need = 2 * n * d * 4 + 8 * hidden * (d + 10) * 4
    rules.check_memory(need, f"training on {n} images of {d} values, hidden {hidden},",
                       "lower --train-size/--hidden")


def _finite_or_fail(params: dict, args) -> None:
    """A diverged training (NaN / inf weights) fails here: nothing is saved."""
    leaves = [np.asarray(v) for v in jax.tree.leaves(params)]
    bad = sum(int(np.size(v) - np.count_nonzero(np.isfinite(v))) for v in leaves)
    if bad:
        total = sum(int(np.size(v)) for v in leaves)
        raise ConfigError(f"training diverged: {bad} of {total} weights are NaN/inf "
                          f"(lr {args.lr if args.lr is not None else 'default'}); lower --lr; "
                          "nothing saved")


def _save(args, params, model, ds: datasets.Dataset, poison_config=None, *, train_size: int,
          defense=None, train=None, **extra) -> None:
    """Write --save: safetensors (or .npz by its suffix) with the metadata readers need
    (model reference and hyper-parameters, input shape/range, classes, training config and
    seed, `train_size` (the training images it saw: `detect`'s default --sample-size),
    dataset name and content hash, poisoning; a training defense: its name, eps, PGD steps
    and the resolved epochs; and `extra` keys). train: the resolved TrainConfig (default:
    the options given)."""
    save = Path(args.save)  # only its own file and its own temp files are touched
    clean_stale_temps(save.parent, recursive=False, names={save.name})
    meta = weights.metadata(model, train=_train_config(args) if train is None else train,
                            dataset=ds, poison=poison_config, train_size=int(train_size),
                            **({"defense": defense} if defense is not None else {}), **extra)
    weights.save(args.save, params, meta)


def poisoned_data_path(save: str) -> Path:
    """Where `poison --save FILE` writes the poisoned training set: FILE's stem + .train.npz
    beside it (poisoned.safetensors -> poisoned.train.npz)."""
    path = Path(save)
    return path.with_name(f"{path.stem}.train.npz")


def _save_poisoned_data(path: Path, x, y, ds: datasets.Dataset) -> None:
    """Write the training set a poisoned model was trained on as a keras-style .npz
    (x_train, y_train: the poisoned images and labels; x_test, y_test: the clean test set),
    images as uint8 on 0..255 over the input range (a blended trigger's values round to
    1/255 of the range), atomically; `--dataset FILE` reads it back."""
    lo, hi = (float(v) for v in ds.input_range)
    shape = tuple(ds.image_shape) if ds.image_shape[-1] != 1 else tuple(ds.image_shape[:2])

    def u8(a):
        a = np.clip(np.rint((np.asarray(a, np.float64) - lo) / (hi - lo) * 255.0), 0, 255)
        return a.astype(np.uint8).reshape(len(a), *shape)

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, x_train=u8(x), y_train=np.asarray(y, np.int64),
                            x_test=u8(ds.x_test), y_test=np.asarray(ds.y_test, np.int64))


def _check_fits(model, ds: datasets.Dataset) -> None:
    """The model takes this dataset's images and classes, or one line saying what differs."""
    if (tuple(model.input_shape), model.n_classes) != (tuple(ds.image_shape), ds.n_classes):
        raise ConfigError(f"{model.name} takes images {tuple(model.input_shape)} with "
                          f"{model.n_classes} classes; {ds.name} has {tuple(ds.image_shape)} "
                          f"with {ds.n_classes}: pass the --dataset the model was trained on")
    (lo, hi), (d_lo, d_hi) = model.input_range, ds.input_range
    tol = 1e-5 * (d_hi - d_lo)  # core.checks.RANGE_TOL
    if abs(lo - d_lo) > tol or abs(hi - d_hi) > tol:
        raise ConfigError(f"input_range: {model.name} takes inputs in [{lo:g}, {hi:g}]; "
                          f"{ds.name} is scaled to [{d_lo:g}, {d_hi:g}]: pass the --dataset "
                          "the model was trained on")


def _trained_with(meta: dict, *fields: str) -> TrainConfig:
    """The TrainConfig of `fields` a weights file's metadata records (the rest: defaults)."""
    trained = meta.get("train") or {}
    return TrainConfig(**{k: trained[k] for k in fields if trained.get(k) is not None})


def _load_weights(path: str, model: str | None = None):
    """(model, params, meta) of a weights file: the architecture from its metadata, else from
    the arrays' layout (before the data loads: a bad file is one line). model: --model, the
    user's own "pkg.module:attr" the file must name (a file's reference alone is never
    imported)."""
    model, params, meta = load_model(path, model=model)
    return model, params, meta or {}


# --- train --------------------------------------------------------------------------------


def cmd_train(args) -> None:
    cfg = _check_recipe(args)
    if args.defense not in (None, "adv-train"):
        raise ConfigError(f"train --defense: expected adv-train (the training-time defense), "
                          f"found {args.defense!r}; wrap a trained model with attack --defense")
    ds = _load(args)
    train = _train_split(args, ds)
    _check_train_memory(train.x_train, cfg.hidden, "train")
    start = time.perf_counter()
    defense_meta = None
    if args.defense == "adv-train":
        if args.epochs is None:  # adversarial training takes twice the recipe's epochs
            cfg = replace(cfg, epochs=ADV_EPOCH_FACTOR * int(cfg.epochs))
        model, params = api.adv_fit(args.model, train, cfg, eps=args.eps, steps=args.steps,
                                    warmup=args.warmup)
        defense_meta = {"name": "adv-train", "eps": float(args.eps), "steps": int(args.steps),
                        "warmup": float(args.warmup), "epochs": int(cfg.epochs)}
    else:
        model, params = api.fit(args.model, train, _train_config(args))
    train_seconds = time.perf_counter() - start
    params = jax.tree.map(np.asarray, params)
    _finite_or_fail(params, args)
    scores = api.evaluate(model, params, ds.x_test, ds.y_test)
    # one shape with and without --defense / --save (docs/json.md): absent facts are null
    result = {"model": args.model, **scores, "train_seconds": train_seconds,
              "train_size": int(len(train.y_train)), "data_source": ds.source,
              "backend": jax.default_backend(), "defense": args.defense, "eps": None,
              "train_steps": None, "warmup": None, "epochs": None, "pgd40_accuracy": None,
              "saved": None}
    if args.defense == "adv-train":  # the robust accuracy it was trained for: PGD-40 at eps
        x_adv = api.attack("pgd", model, params, ds.x_test, ds.y_test, eps=args.eps, steps=40,
                           seed=args.seed)
        result.update({"eps": args.eps, "train_steps": args.steps,
                       "warmup": args.warmup, "epochs": int(cfg.epochs),
                       "pgd40_accuracy": api.evaluate(model, params, x_adv,
                                                      ds.y_test)["accuracy"]})
    if args.save:
        _save(args, params, model, ds, defense=defense_meta,
              train=cfg if defense_meta else None, train_size=len(train.y_train))
        result["saved"] = args.save
    _emit(args.format, result, _given(result), headers=["", "value"])


# --- stability ----------------------------------------------------------------------------


def cmd_stability(args) -> None:
    ds = _train_split(args, _load(args))
    table, seconds = api.stability(ds, samples=args.samples, size=args.size, hidden=args.hidden,
                               lr=args.lr, epochs=args.epochs or 1, seed=args.seed)
    payload = {"samples": table.to_dict(orient="index"), "train_seconds": seconds,
               "data_source": ds.source}
    _emit(args.format, payload, table.reset_index().values.tolist(),
          headers=["", *table.columns])


# --- attack -------------------------------------------------------------------------------


def _check_attack_memory(n: int, d: int, hidden: int, attacks) -> None:
    """Inputs, adversarial copies and gradients of n images (PGD keeps a few more)."""
    copies = 6 if any(a.name.startswith("pgd") for a in attacks) else 4
    need = n * d * 4 * copies + n * hidden * 4 * 4
    rules.check_memory(need, f"attacking {n} images of {d} values", "lower --n")


def cmd_attack(args) -> None:
    attacks = [get_attack(name) for name in args.attack]
    if args.defense is not None:
        get_defense(args.defense)  # a bad name fails before the data loads
    if args.params is None and args.model is None:
        raise ConfigError("give --params FILE (with --model PKG.MOD:ATTR when the file names "
                          "user code) or --model NAME to train one")
    if args.params:
        given = [f"--{k.replace('_', '-')}" for k in TRAIN_OPTIONS
                 if k != "model" and getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: training options apply only with --model "
                              "alone; --params gives a trained model")
        model, params, meta = _load_weights(args.params, args.model)  # before the data loads
    else:
        args.hidden = 200 if args.hidden is None else args.hidden
        args.seed = 0 if args.seed is None else args.seed
        _check_recipe(args)
        meta = None
    ds = _load(args, meta)
    if args.params and not meta.get("model"):  # a metadata-free file: place it on this data
        model = infer_model(params, ds.spec)
    n = rules.check_at_most(args.n, len(ds.y_test), "--n", f"test images of {ds.name}")
    hidden = dict(model.hparams).get("hidden", 200) if args.params else args.hidden
    _check_attack_memory(n, ds.x_test.shape[1], hidden, attacks)
    if not args.params:
        train = _train_split(args, ds)
        _check_train_memory(train.x_train, args.hidden, "attack --model")
        model, params = api.fit(args.model, train, _train_config(args))
        params = jax.tree.map(np.asarray, params)
        _finite_or_fail(params, args)
        if args.save:
            _save(args, params, model, ds, train_size=len(train.y_train))
    _check_fits(model, ds)
    params = jax.device_put(jax.tree.map(lambda v: jax.numpy.asarray(v, jax.numpy.float32),
                                         params))
    x, y = jax.device_put((ds.x_test[:n], ds.y_test[:n]))
    undefended = params
    if args.defense:
        if get_defense(args.defense).kind == "training" and (
                args.model is None or args.params is not None):
            raise ConfigError("attack --defense adv-train trains the model: give --model NAME "
                              "(a saved adversarially trained model: --params without "
                              "--defense)")
        model, params = api.defend(
            args.defense, model, params, ds, key=attack_key(args.seed or 0), recipe=args.model,
            cfg=TrainConfig(hidden=args.hidden, seed=args.seed, epochs=args.epochs),
            eps=max(args.eps))
    table = api.attack_table(
        model, params, x, y, args.attack, args.eps, seed=args.seed or 0, rounds=args.rounds,
        options={"steps": args.steps, "restarts": args.restarts, "queries": args.queries,
                 "loss": args.loss, "target": args.target},
        undefended=undefended if args.defense == "adv-train" else None,
        flags=bool(args.defense))
    rows, flags = table["rows"], table["flags"]
    if args.format == "json":  # one shape with and without --defense (docs/json.md)
        print(strict_json({"model": model.name, "defense": args.defense, "n_images": n,
                           "rows": rows, "flags": flags}))
        return
    _emit("table", rows)
    if args.defense:
        print(f"\nflags ({model.name}):" if flags else f"\nflags ({model.name}): none raised")
        for line in flags:
            print(f"  - {line}")


# --- poison -------------------------------------------------------------------------------


def cmd_poison(args) -> None:
    from mlshift_jax.bench import sweeps  # pandas: kept off `mlshift --help`

    config = sweeps.config_from(args.kind, {"fraction": args.fraction, "patch": args.patch,
                                            "target": args.target, "mode": args.mode,
                                            "source": args.source})  # checked
    spec = datasets.builtin_spec(args.dataset)
    if spec is not None:  # a built-in's shape and classes are known before it loads
        check_for(config, spec)
    _check_recipe(args)
    if args.sweep and args.save:
        raise ConfigError("--save: saves the one model `poison` trains; --sweep trains "
                          "many (drop one of them)")
    if args.sweep and (args.lr is not None or args.batch_size is not None
                       or args.optimizer is not None):
        raise ConfigError("--lr/--batch-size/--optimizer: the sweeps train with each "
                          "model's recipe defaults; drop them with --sweep")
    ds = _load(args)
    x, y = _train_data(args, ds)
    _check_train_memory(x, args.hidden, "poison")
    common = dict(model=args.model, seed=args.seed, hidden=args.hidden, epochs=args.epochs,
                  n_train=args.train_size)
    if not args.sweep:
        result = api.poison_and_fit(ds, args.kind, fraction=args.fraction, patch=args.patch,
                                    target=args.target, mode=args.mode, source=args.source,
                                    lr=args.lr, batch_size=args.batch_size,
                                    optimizer=args.optimizer, **common)
        params = result.pop("params")
        _finite_or_fail(params, args)
        # poisoned_count = round(fraction * eligible_count): the classes it may poison (a
        # target class's own images are never relabelled to it)
        eligible = eligible_classes(config, ds.n_classes)
        result.update(eligible_classes=np.flatnonzero(eligible).tolist(),
                      eligible_count=int(eligible[np.asarray(y)].sum()))
        result.update(saved=None, saved_training_set=None)  # one shape with or without --save
        if args.save:
            # the member's poisoning, redrawn exactly as the population drew it
            xp, yp, _ = apply_poison(poison_key(args.seed), x, y, config, ds.spec)
            data = poisoned_data_path(args.save)
            _save_poisoned_data(data, xp, yp, ds)
            _save(args, params, api.build(args.model, ds, _train_config(args)), ds,
                  poison_config=config, poisoned_data={"file": data.name,
                                                       "kind": args.kind},
                  train_size=len(y))
            result["saved"] = args.save
            result["saved_training_set"] = str(data)
        _emit(args.format, result, _given(result), headers=["", "value"])
        return

    tables, found = api.poison_sweeps(ds, log=_log, **common)
    if args.format == "json":
        payload = {name: json.loads(t.to_json(orient="records")) for name, t in tables.items()}
        payload["findings"] = json.loads(found.to_json(orient="records"))
        print(strict_json(payload))
    else:
        print(sweeps.markdown(tables, found))


# --- detect -------------------------------------------------------------------------------


def cmd_detect(args) -> None:
    from mlshift_jax.detection.change import CalibrationConfig, check_pair  # scipy: lazy
    from mlshift_jax.detection.fingerprint import check_alpha

    (model, reference, meta), (other, suspect, meta_s) = (
        _load_weights(p, args.model) for p in (args.reference, args.suspect))
    user = ":" in model.name or ":" in other.name  # built-ins: the arrays name the model
    kw = {"model": model, "suspect_model": other} if user else {}
    name = check_pair(reference, suspect, **kw,  # before the data loads: one line
                      names=(f"--reference {args.reference}", f"--suspect {args.suspect}"))
    check_alpha(args.alpha, args.null_models, alpha_name="--alpha", null_name="--null-models")
    ds = _load(args, meta)
    size = args.sample_size if args.sample_size is not None else _reference_size(meta, ds)
    rules.check_at_most(size, len(ds.y_train), "--sample-size",
                        f"training images of {ds.name}")
    for path, m in ((args.reference, meta), (args.suspect, meta_s)):  # after every refusal
        if not m.get("model"):
            _log(f"detect: {path} carries no metadata: read as {name} from its array names "
                 "and shapes")
    if user:  # retrain as the reference was trained (its metadata's settings)
        kw["train"] = _trained_with(meta, "lr", "epochs", "batch_size", "optimizer")
    config = CalibrationConfig(sample_size=size, n_null=args.null_models, seed=args.seed)
    result = api.detect_change(kw.pop("model", None), reference, suspect, ds, seed=args.seed,
                               alpha=args.alpha, config=config, log=_log, **kw)
    if args.format == "json":
        print(strict_json(result))
        return
    rows = [[k, result[k]] for k in ("verdict", "p_value", "alpha", "category",
                                     "changed_probability", "architecture") if k in result]
    rows[1][1] = _p_text(result["p_value"], result["p_resolution"])
    rows += [[f"p {k}", _p_text(v, result["p_resolution"])]
             for k, v in result["feature_p_values"].items()]
    rows += [[f"fingerprint {k}", v] for k, v in result["fingerprint"].items()
             if k != "transitions"]
    _emit("table", None, rows, headers=["", "value"])


def _reference_size(meta: dict, ds: datasets.Dataset) -> int:
    """detect's default --sample-size: the training images the reference saw (its metadata's
    `train_size`), else 10,000; at most the training images ds has."""
    trained = meta.get("train_size")
    size = trained if isinstance(trained, int) and trained >= 1 else 10_000
    return min(size, len(ds.y_train))


def _p_text(p: float, resolution: float) -> str:
    """A p-value at its resolution: 1 / (n_null + 1) steps, never printed as 0 ("0.04 (=
    1/25, the smallest)" at the floor)."""
    steps = round(p / resolution)
    text = f"{p:.3g}"
    return f"{text} (= 1/{round(1 / resolution)}, the smallest)" if steps <= 1 else text


# --- scan-model ---------------------------------------------------------------------------


def cmd_scan_model(args) -> None:
    from mlshift_jax.detection.neural_cleanse import ScanConfig  # scipy: lazy
    from mlshift_jax.detection.scan import NullConfig, save_triggers

    null_cfg = NullConfig(n_null=args.null_models, sample_size=args.sample_size,
                          images=args.n, alpha=args.alpha, seed=args.seed).validate(
        "scan-model", {"n_null": "--null-models", "images": "--n", "alpha": "--alpha",
                       "sample_size": "--sample-size"})
    scan_cfg = ScanConfig(**({"steps": args.steps} if args.steps is not None else {}))
    scan_cfg.validate()
    if args.out is not None:
        outdir.claim(args.out)
    model, params, meta = _load_weights(args.params, args.model)  # before the data loads
    if ":" in model.name:  # a user model: its null retrains as it was trained
        train = _trained_with(meta, "hidden", "lr", "epochs", "batch_size", "optimizer")
    else:  # built-ins: the recipe's trainer; the epochs and lr the file was trained with
        train = _trained_with(meta, "lr", "epochs")
    ds = _load(args, meta)
    if not meta.get("model"):  # a metadata-free file: place it on this data
        model = infer_model(params, ds.spec)
    _check_fits(model, ds)
    rules.check_at_most(args.n, len(ds.y_test), "--n", f"test images of {ds.name}")
    if args.sample_size is not None:
        rules.check_at_most(args.sample_size, len(ds.y_train), "--sample-size",
                            f"training images of {ds.name}")
    if not meta.get("model"):  # after every refusal
        _log(f"scan-model: {args.params} carries no metadata: read as {model.name} from its "
             f"array shapes; its null trains with that recipe's default settings")
    result = api.scan_model(model, params, ds, config=scan_cfg, null_config=null_cfg,
                            train=train, log=_log)
    trigger = result.pop("trigger")
    result["files"], note = [], ""
    if args.out is not None:
        outdir.record(args.out, files=[Path(args.out) / n for n in (
            "triggers.npz", "target-mask.npy", "target-pattern.npy", "triggers.png",
            "target.png")])
        result["files"], note = save_triggers(trigger, args.out, target=result["target"],
                                              input_range=model.input_range)
    result["note"] = "; ".join(n for n in (result.get("note"), note) if n) or None
    if args.format == "json":
        print(strict_json(result))
        return
    rows = [[k, result[k]] for k in ("verdict", "target", "combined_p", "combined_threshold",
                                     "flagged_by", "threshold_fpr", "n_null", "alpha")]
    rows += [[f"{name} {k}", v] for name, d in result["detectors"].items()
             for k, v in d.items() if k in ("score", "p_value", "target")]
    rows += [[k, result[k]] for k in ("anomaly_index", "threshold", "smallest_class",
                                      "scan_seconds", "compile_seconds", "architecture")]
    rows += [[f"held-out FPR {k}", v] for k, v in result["threshold_fpr_by_variant"].items()]
    rows += [[f"class {k} mask norm / attack rate", f"{n:.2f} / {r:.3f}"] for k, (n, r) in
             enumerate(zip(result["mask_norms"], result["attack_rates"], strict=True))]
    rows += [["file", f] for f in result["files"]] + (
        [["note", result["note"]]] if result.get("note") else [])
    _emit("table", None, rows, headers=["", "value"])
# --- scan-data ----------------------------------------------------------------------------


def _share(flag: str, unit: str):
    """argparse type: a finite number in 0..1, ConfigError naming `flag` else."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"{flag}: expected a finite number in 0..1 ({unit}), found "
                              f"{text!r}")
        return value

    return parse


def _count(flag: str, unit: str):
    """argparse type: an integer >= 1, ConfigError naming `flag` else."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"{flag}: expected an integer >= 1 ({unit}), found {text!r}")
        return value

    return parse


def _scan_data_dataset(args, meta: dict) -> bool:
    """Which data scan-data scans, never a silent guess: --dataset when given; else the
    poisoned training set `poison --save` wrote beside the weights (`poisoned_data_path`:
    the only place looked at; a path written in the file's metadata is never followed);
    else, for a model whose metadata says it was trained on poisoned data, a ConfigError
    naming the data it needs (the clean set would scan the wrong images); else the dataset
    its metadata names. -> True when the poisoned set was chosen (its images load on the
    model's input range)."""
    if args.dataset is not None:
        return False
    beside = poisoned_data_path(args.params)
    if meta.get("poisoned_data") and beside.is_file():
        args.dataset = str(beside)
        _log(f"dataset: the poisoned training set poison --save wrote, {beside}")
        return True
    if meta.get("poison"):  # a non-clean poisoning (a clean one is stored as {})
        raise ConfigError(f"scan-data: the model was trained on poisoned data and {beside} "
                          "(where poison --save writes that set) is missing; scanning the "
                          "clean training set would flag the wrong images: pass --dataset "
                          "FILE.npz, the training set it was trained on")
    return False


def cmd_scan_data(args) -> None:
    """Which training samples look poisoned? Every --method's scores on the training set."""
    if args.out is not None and not args.out.endswith(".csv"):
        raise ConfigError(f"--out: expected a FILE.csv, found {args.out!r}")
    model, params, meta = _load_weights(args.params, args.model)  # one line, before data
    if model.stochastic:
        raise ConfigError(f"scan-data: expected a deterministic model, found {model.name} "
                          "(stochastic): its activations differ per call")
    saved = _scan_data_dataset(args, meta)
    ds = _load(args, meta, scale=tuple(model.input_range) if saved else None)
    _check_fits(model, ds)
    x, y = _train_data(args, ds)
    _log(f"scanning the first {len(y):,} training images of {ds.name} ({ds.source})")
    rules.check_memory(2 * x.shape[0] * (x.shape[1] + 4 * 1024) * 4,
                       f"scanning {x.shape[0]} training images", "lower --train-size")
    methods = list(dict.fromkeys(args.method))
    found = api.scan_data(model, params, x, y, eps=args.eps, seed=args.seed, methods=methods,
                          reference=(ds.x_test, ds.y_test))  # clean
    y = np.asarray(y)
    scores = {m: np.asarray(found[m].score, np.float64) for m in methods}
    flags = {m: np.asarray(found[m].flag, bool) for m in methods}
    if args.out is not None:
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            f.write(",".join(["index", "label", *(f"{m}_{k}" for m in methods
                                                  for k in ("score", "flag"))]) + "\n")
            for i in range(len(y)):
                f.write(",".join([str(i), str(int(y[i])), *(
                    f"{scores[m][i]:.6g},{int(flags[m][i])}" for m in methods)]) + "\n")
    result = {"dataset": ds.name, "dataset_source": ds.source, "n": int(len(y)),
              "eps": args.eps, "methods": {}}
    rows = []
    for m in methods:
        top = np.argsort(-scores[m], kind="stable")[:args.top]
        entry = {"flagged": int(flags[m].sum()),
                 "top": [{"index": int(i), "label": int(y[i]), "score": float(scores[m][i]),
                          "flagged": bool(flags[m][i])} for i in top],
                 "suspect_classes": None if found[m].classes is None else [
                     int(c) for c in np.flatnonzero(np.asarray(found[m].classes))]}
        result["methods"][m] = entry
        rows += [[m, r + 1, t["index"], t["label"], t["score"], t["flagged"]]
                 for r, t in enumerate(entry["top"])]
    result["out"] = args.out  # null without --out: one shape (docs/json.md)
    if args.format == "json":
        print(strict_json(result))
        return
    _emit("table", None, rows, headers=["method", "rank", "index", "label", "score",
                                         "flagged"])
    print(f"scanned: the first {len(y):,} training images of {ds.name} ({ds.source})")
    for m in methods:
        extra = result["methods"][m].get("suspect_classes")
        print(f"{m}: {result['methods'][m]['flagged']} of {len(y)} flagged"
              + (f"; suspect classes {extra}" if extra is not None else ""))


# --- bench --------------------------------------------------------------------------------


def _bench_out(args, matrix: Path) -> tuple[Path, Path | None, str]:
    """(out folder, folder for a run on the bundled sample or None, why it is not the default).

    Only the default matrix on the full data writes the committed results/<platform>/; a
    custom matrix, --quick or the bundled sample each get their own folder unless --out says
    otherwise, so a results folder always holds one kind of run."""
    from mlshift_jax.bench import report  # pandas: kept off `mlshift --help`

    if args.out is not None:
        if not args.out.strip():
            raise ConfigError("--out: expected a folder, found an empty string")
        out = Path(args.out)
        committed = report.default_out_dir()
        if out.resolve() == committed.resolve() and not (args.matrix or args.quick):
            return out, committed.with_name(committed.name + "-sample"), ""
        return out, None, ""
    out = report.default_out_dir()
    why = ""
    if args.matrix:
        out, why = out.with_name(f"{out.name}-{matrix.stem}"), f"custom matrix {matrix.name}"
    elif args.quick:
        out = out.with_name(out.name + "-quick")  # never overwrite the committed full results
    return out, out.with_name(out.name + "-sample"), why


def cmd_bench(args) -> None:
    from mlshift_jax.bench import report, runner  # pandas: kept off `mlshift --help`
    from mlshift_jax.bench.matrix import load as load_matrix
    from mlshift_jax.bench.matrix import with_dataset

    if args.distributed:  # before any other JAX call (platform names, devices)
        initialize_distributed()
    matrix = Path(args.matrix) if args.matrix else (
        runner.QUICK_MATRIX if args.quick else runner.DEFAULT_MATRIX)
    if not matrix.is_file():
        found = "a folder" if matrix.is_dir() else "nothing"
        raise ConfigError(f"{matrix}: expected a matrix TOML file, found {found}; pass "
                          "--matrix PATH")
    allow = tuple(args.model or ())  # the user code the user names, never the matrix
    mx = load_matrix(matrix, allow_code=allow)  # every key checked before anything runs
    if args.dataset is not None:
        with_dataset(mx, args.dataset)
    out, sample_out, why = _bench_out(args, matrix)
    outdir.claim(out)
    runner._check_committed(out, matrix, args.dataset, sample=False)
    if why:
        print(f"mlshift: {why}: results go to {out}, not {report.default_out_dir()} "
              "(pass --out to choose)", file=sys.stderr)
    print(f"mlshift: bench {matrix} -> {out}; {describe_devices()}", file=sys.stderr)
    start = time.perf_counter()
    _interrupt.cells = out / runner.CACHE_DIR / "cells"  # Ctrl-C before run() knows its cells
    records = api.run_matrix(matrix, out_dir=out, only=args.only, force=args.force,
                             data_dir=args.data_dir, dataset=args.dataset,
                             sample_out_dir=sample_out, reuse_stale=args.reuse_stale,
                             tiny=args.tiny, allow_code=allow)
    out = Path(records.attrs["run"]["out_dir"])
    seconds = time.perf_counter() - start
    if args.only:  # a partial run: show its cells, leave the full tables as they are
        cols = [c for c in ("id", "status", "accuracy", "f1", "median_s") if c in records]
        print(tabulate(records[cols].values.tolist(), headers=cols, floatfmt=".4f"))
        print(f"mlshift: --only: {len(records)} cells in {seconds:.0f} s, cached in {out}; "
              "tables not written: a run without --only writes them from the cache, and "
              "tables already there are left unchanged", file=sys.stderr)
        return
    if jax.process_index() != 0:  # a multi-host run: process 0 writes the report
        return
    paths = report.write(records, out)
    run = records.attrs["run"]
    stale = f", {run['stale']} STALE" if run["stale"] else ""
    skipped = f", {run['skipped_cells']} skipped" if run["skipped_cells"] else ""
    print(f"wrote {len(paths)} files to {out} ({run['cells']} cells: {run['computed']} "
          f"computed in {run['compute_s']:.0f} s, {run['reused']} reused{stale}{skipped}) in "
          f"{seconds:.0f} s")


# --- parser -------------------------------------------------------------------------------


def _names(mapping) -> str:
    return ", ".join(mapping)


def _eps_norms() -> str:
    """What eps bounds, from the attack records: the L-inf norm, or each other's label."""
    other = [f"{a.name}: {a.label}" for a in ATTACKS.values() if not a.linf_bounded]
    return "the L-inf bound" + (f"; {', '.join(other)}" if other else "")


def _options():
    """Every option, defined once: flag -> add_argument keywords (shared by every command)."""
    data_methods = [d.name for d in of_unit("sample")]

    def num(name, default, text):
        return {"type": rules.argtype(name), "default": default, "metavar": name.upper(),
                "help": f"{text}: {rules.describe(name)}"}

    return {
        "data_dir": {"help": "folder with the dataset's files (IDX, gz or raw, or CSV)",
                     "metavar": "DIR"},
        "dataset": {"default": "mnist", "metavar": "NAME|PATH",
                    "help": f"a built-in dataset ({', '.join(datasets.DATASETS)}) or a path"},
        "format": {"choices": ["table", "json"], "default": "table",
                   "help": "output: a table, or strict JSON (NaN/inf -> null + non_finite)"},
        "model": {"default": "seed-mlp", "metavar": "NAME|PKG.MOD:ATTR",
                  "help": f"the model to train: {_names(RECIPES)}, or pkg.module:attr"},
        "hidden": num("hidden", 200, "hidden width"),
        "lr": num("lr", None, "learning rate; default: the model's own"),
        "epochs": num("epochs", None, "training epochs; default: the model's own"),
        "batch_size": num("batch_size", None, "minibatch size; default: the model's own "
                          "(per-sample models ignore it)"),
        "optimizer": {"choices": sorted(OPTIMIZERS), "default": None,
                      "help": "optimizer of minibatch models; default: the model's own"},
        "seed": num("seed", 0, "seed of every random draw"),
        "train_size": num("train_size", None, "train on the first N training images "
                          "(more than there are is an error); default: all"),
        "save": {"metavar": "FILE", "help": "write the trained params here, atomically: .npz when "
                 "FILE ends in .npz, else safetensors"},
        "samples": num("samples", 10, "models, one per random sample"),
        "size": num("size", 10_000, "training images per sample"),
        "params": {"metavar": "FILE", "help": "a trained model saved by --save (safetensors or "
                   ".npz)"},
        "attack": {"nargs": "+", "default": ["fgsm"], "choices": list(ATTACKS),
                   "metavar": "ATTACK", "help": f"one or more of: {_names(ATTACKS)}"},
        "eps": {"nargs": "+", "type": rules.argtype("eps"), "default": [0.1, 0.2, 0.3],
                "help": f"perturbation sizes, each in the attack's own norm ({_eps_norms()}): "
                f"{rules.describe('eps')}"},
        "target": num("target", 3, "target class (targeted attacks; mixture and "
                      "wrong-label mode target relabel to it)"),
        "n": num("n", None, "attack the first N test images; default: all"),
        "rounds": num("rounds", 3, "timed rounds per cell"),
        "defense": {"default": None, "choices": list(DEFENSES), "metavar": "DEFENSE",
                    "help": f"wrap the model first: {_names(DEFENSES)} (adv-train with "
                    "--model: trains adversarially at the largest --eps)"},
        "steps": num("steps", None, "steps of the iterative attacks (pgd, eot-pgd, "
                     "bpda-pgd, transfer); default: each attack's own"),
        "restarts": num("restarts", None, "random restarts of the adaptive attacks; "
                        "default: each attack's own"),
        "queries": num("queries", None, "model queries of Square Attack (square; "
                       "autoattack's Square, default 5000); default: each attack's own"),
        "loss": {"default": None, "choices": list(LOSSES),
                 "help": "the gradient attacks' loss: ce (cross-entropy on the logits, the "
                 "default), dlr (Difference of Logits Ratio) or train (the model's own "
                 "training loss, as the study's FGSM)"},
        "warmup": num("warmup", 0.0, "adv-train: share of training over which eps ramps up "
                      "from 0 (0.5 lets the cnn train at eps 0.3)"),
        "kind": {"default": "mixture", "choices": list(POISONINGS),
                 "help": f"poisoning: {_names(POISONINGS)}"},
        "fraction": num("fraction", 0.1, "share of the eligible training images poisoned (of "
                        "--source when given; never those already of --target): "
                        "poisoned_count = round(fraction x eligible_count)"),
        "patch": num("patch", 4, "trigger side"),
        "mode": {"default": "uniform", "choices": list(MODES),
                 "help": f"wrong-label mode: {_names(MODES)}"},
        "source": num("source", None, "poison only this class; default: every class"),
        "sweep": {"action": "store_true",
                  "help": "run the study's sweeps (E4-E7 + BadNets) instead of one cell"},
        "reference": {"required": True, "metavar": "FILE",
                      "help": "params of the reference model (safetensors or .npz)"},
        "suspect": {"required": True, "metavar": "FILE",
                    "help": "params of the model to test (safetensors or .npz)"},
        "alpha": num("alpha", 0.05, "the test's level (its false-positive rate on benign "
                     "models); refused below 1/(null models + 1), the smallest p-value"),
        "sample_size": num("sample_size", None, "training images of each benign model in "
                           "the null; match how the reference was trained; default: the "
                           "reference's training-set size (its metadata's train_size), else "
                           "10000; at most all the training images"),
        "null_models": num("null_models", 104, "benign models in the null (retrains, "
                           "pruned, quantized, fine-tuned, distilled; cached): the smallest "
                           "p-value is 1/(N+1): N >= 19 for alpha 0.05, 99 for 0.01; fewer "
                           "is faster"),
        "method": {"nargs": "+", "default": data_methods, "choices": data_methods,
                   "metavar": "METHOD", "help": f"one or more of: {', '.join(data_methods)}"},
        "top": {"type": _count("--top", "samples listed per method"), "default": 20,
                "metavar": "N", "help": "list the N highest-scoring samples of each method"},
        "quick": {"action": "store_true", "help": "the CI-sized matrix"},
        "matrix": {"metavar": "FILE.toml",
                   "help": "a matrix TOML file; default the packaged full.toml (a custom matrix "
                   "writes to results/<platform>-<name>/ unless --out)"},
        "only": {"metavar": "PATTERN",
                 "help": "run only the cells whose id matches (glob or substring) and cache "
                         "them; the tables are written only by a run without --only"},
        "out": {"metavar": "DIR", "help": "output folder; default results/<platform>/ (its "
                "-quick, -<matrix> or -sample sibling for --quick, --matrix or the bundled "
                "sample)"},
        "force": {"action": "store_true", "help": "rerun cells even if cached"},
        "tiny": {"action": "store_true",
                 "help": "every cell of the matrix at a smoke test's size (a few hundred "
                 "images, hidden 16): a rehearsal whose numbers mean nothing "
                 "(scripts/bench_gpu.sh --dry-run)"},
        "reuse_stale": {"action": "store_true",
                        "help": "reuse cached cells computed by other code (another code "
                        "digest) instead of recomputing them; the tables mark them STALE "
                        "with the commit they came from"},
        "distributed": {"action": "store_true",
                        "help": "join a multi-process run first (jax.distributed.initialize; "
                        "MLSHIFT_COORDINATOR, MLSHIFT_NUM_PROCESSES, MLSHIFT_PROCESS_ID)"},
    }


def _add(p: argparse.ArgumentParser, options: dict, *names: str, **override) -> None:
    for name in names:
        kw = {**options[name], **override.get(name, {})}
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, **kw)


DATA = ("data_dir", "dataset", "format")
PATH_OPTIONS = ("data_dir", "dataset", "save", "params", "reference", "suspect", "matrix",
                "out")


def build_parser() -> argparse.ArgumentParser:
    options = _options()
    parser = _Parser(prog="mlshift", description=__doc__.splitlines()[0],
                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"mlshift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, func, text, *names, **override):
        p = sub.add_parser(name, help=text, description=text, formatter_class=_Help)
        _add(p, options, *names, **override)
        p.set_defaults(func=func)
        return p

    command("train", cmd_train, "train one model and score it", *DATA, *TRAIN_OPTIONS,
            "defense", "eps", "steps", "warmup",
            defense={"choices": ["adv-train"], "default": None, "help": "adv-train: PGD "
                     "adversarial training (Madry et al. 2018); the other defenses wrap a "
                     "trained model: attack --defense"},
            eps={"nargs": None, "default": 0.1, "help": "adv-train: the PGD L-inf budget: "
                 f"{rules.describe('eps')}"},
            steps={"default": 7, "help": f"adv-train: PGD steps per batch: "
                   f"{rules.describe('steps')}"})
    command("stability", cmd_stability, "E2: seed-mlp models on random training samples, "
            "trained as one population", *DATA, "samples", "size", "hidden", "lr", "epochs",
            "seed", "train_size",
            lr={"default": 0.1, "help": f"learning rate: {rules.describe('lr')}"},
            epochs={"default": 1, "help": f"training epochs: {rules.describe('epochs')}"},
            train_size={"help": "draw the samples from the first N training images; default: "
                        f"all. {rules.describe('train_size')}"})
    none_default = {"default": None}
    command("attack", cmd_attack, "E3: attack a model at test time and score it at each eps",
            *DATA, "params", *TRAIN_OPTIONS, "attack", "eps", "target", "n", "rounds",
            "defense", "steps", "restarts", "queries", "loss",
            model={"default": None, "metavar": "NAME|PKG.MOD:ATTR",
                   "help": "train this model first; with --params: the user model "
                   "(pkg.module:attr) the file names, which is never imported unless given "
                   "here"},
            dataset={"default": None, "metavar": "NAME|PATH",
                     "help": "a built-in dataset or a path; default: with --params, the one "
                     "the weights' metadata names, else mnist"},
            hidden={**none_default, "help": "hidden width with --model (default 200): "
                    f"{rules.describe('hidden')}"},
            seed={**none_default, "help": "seed of training and of random attacks (default 0): "
                  f"{rules.describe('seed')}"})
    command("poison", cmd_poison, "E4-E7: poison the training data, train, score clean and "
            "triggered", *DATA, *TRAIN_OPTIONS, "kind", "fraction", "patch", "target", "mode",
            "source", "sweep")
    command("detect", cmd_detect, "has the suspect model changed from the reference, and how? "
            f"({FINGERPRINT.label} and categorizer)",
            *DATA, "reference", "suspect", "model", "alpha", "sample_size", "null_models",
            "seed",
            model={"default": None, "metavar": "PKG.MOD:ATTR",
                   "help": "the user model the weights file names, given by you: a file's "
                   "pkg.module:attr is never imported unless it is passed here too"},
            dataset={"default": None, "metavar": "NAME|PATH",
                     "help": "the dataset the models were trained on; default: the one the "
                     "reference's metadata names, else mnist"})
    command("scan-model", cmd_scan_model, "is there a backdoor in this model? Neural Cleanse "
            "(Wang et al. 2019) and MM-BD (Wang et al. 2024) in one verdict, calibrated on "
            "benign models of its recipe (retrains, pruned, quantized, fine-tuned, distilled)",
            *DATA, "params", "model", "out", "null_models", "alpha", "sample_size", "n",
            "steps", "seed",
            model={"default": None, "metavar": "PKG.MOD:ATTR",
                   "help": "the user model the weights file names, given by you: a file's "
                   "pkg.module:attr is never imported unless it is passed here too"},
            params={"required": True, "metavar": "FILE",
                    "help": "the model to scan (weights saved by --save)"},
            dataset={"default": None, "metavar": "NAME|PATH",
                     "help": "the dataset the model was trained on; default: the one its "
                     "metadata names, else mnist"},
            out={"metavar": "DIR", "help": "write the reversed triggers here (triggers.npz; "
                 "the target's .npy; PNGs with the plots extra); default: no files"},
            null_models={"default": 104, "help": "benign models of the recipe the threshold is "
                         "calibrated on (cached): at least ceil(5 / alpha), 100 at the default "
                         "alpha"},
            alpha={"default": 0.05, "help": "share of the benign null allowed above the "
                   "threshold (the null needs ceil(5 / alpha) models): "
                   f"{rules.describe('alpha')}"},
            sample_size={"help": "training images of each clean null model (match how the "
                         "model was trained); default: all, each model in its own order. "
                         f"{rules.describe('sample_size')}"},
            n={"default": 300, "help": "clean test images the triggers are searched on (a "
               f"fixed random subset): {rules.describe('n')}"},
            steps={"help": "optimisation steps per class of the trigger search; default: "
                   f"300. {rules.describe('steps')}"},
            seed={"help": "seed of the null's models, the images and the search: "
                  f"{rules.describe('seed')}"})
    command("scan-data", cmd_scan_data, "which training samples look poisoned? "
            f"{', '.join(d.label for d in of_unit('sample'))} on the training set of a "
            "trained model", *DATA, "params", "model", "train_size", "seed", "eps", "method",
            "top", "out",
            model={"default": None, "metavar": "PKG.MOD:ATTR",
                   "help": "the user model the weights file names, given by you: a file's "
                   "pkg.module:attr is never imported unless it is passed here too"},
            params={**options["params"], "required": True},
            dataset={"default": None, "metavar": "NAME|PATH",
                     "help": "the (possibly poisoned) training data the model was trained on; "
                     "default: the one the weights' metadata names, else mnist"},
            train_size={"help": "scan the first N training images (the ones the model was "
                        f"trained on); default: all. {rules.describe('train_size')}"},
            eps={"nargs": None, "default": 0.1, "type": _share("--eps", "the assumed "
                 "poisoned fraction"), "metavar": "EPS",
                 "help": "the assumed poisoned fraction: the spectral methods remove 1.5 * "
                 "EPS of each class; a finite number in 0..1"},
            out={"metavar": "FILE.csv", "help": "also write every training sample's score "
                 "and flag per method here (atomically)"})
    command("bench", cmd_bench, "run the experiment matrix and write results/<platform>/",
            "quick", "matrix", "only", "out", "force", "reuse_stale", "tiny", "distributed",
            "data_dir", "dataset", "model",
            dataset={"default": None, "metavar": "NAME|PATH",
                     "help": "run the matrix on this dataset instead of its own"},
            model={"default": None, "action": "append", "metavar": "PKG.MOD:ATTR",
                   "help": "a user model the matrix names (repeat for each): a matrix's "
                   "pkg.module:attr is never imported unless it is passed here too"})
    return parser


INPUT_FILES = ("params", "reference", "suspect", "matrix")


def _check_path(args, name: str, value: str) -> None:
    """Refuse up front a path option that names a FIFO, a device, a socket, or a folder where
    a file is expected (or a file where a folder is): nothing is opened before this."""
    flag = f"--{name.replace('_', '-')}"
    try:
        mode = os.stat(value).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # inputs: the reader says "no such file"; outputs: created
    except OSError as e:
        raise ConfigError(f"{flag} {value}: expected a usable path, found "
                          f"{e.strerror or e}") from None
    except ValueError:  # an embedded NUL byte
        raise ConfigError(f"{flag}: expected a path, found {value!r}") from None
    folder_wanted = name == "data_dir" or name == "out" and args.func is not cmd_scan_data
    if name == "dataset":  # a built-in name, a .npz / CSV file or an IDX / CSV folder
        ok = stat.S_ISREG(mode) or stat.S_ISDIR(mode)
        wanted = "a file or a folder"
    elif folder_wanted:
        ok, wanted = stat.S_ISDIR(mode), "a folder"
    else:
        ok, wanted = stat.S_ISREG(mode), "a regular file"
    if not ok:
        raise ConfigError(f"{flag} {value}: expected {wanted}, found {file_kind(mode)}")


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"mlshift: warning: {_one_line(message)}", file=sys.stderr)


def _interrupt(signum, frame):
    """Ctrl-C: one line, then exit 130 at once (os._exit after flushing). Raising
    KeyboardInterrupt instead could land inside a JAX callback or compile, be swallowed there
    (the run went on and exited 0), or leave XLA's threads running into interpreter teardown
    (exit 139 during detect's calibration). Files are safe: every write is atomic, and the
    temp file of a write cut short is removed by the next run (`files.clean_stale_temps`)."""
    _interrupt.seen = True
    hard_exit(_interrupted_line())


_interrupt.seen = False
_interrupt.cells = None  # bench: the folder of cached cell records, once it is known


def hard_exit(line: str, code: int = EXIT_INTERRUPTED) -> None:
    """Print `line` to stderr, flush both streams, and end the process with `code` now."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


def _interrupted_line() -> str:
    """What Ctrl-C prints: for bench, how many cell records its cache holds."""
    cells = _interrupt.cells
    if cells is None:
        return "mlshift: interrupted"
    held = len(list(Path(cells).glob("*.json"))) if Path(cells).is_dir() else 0
    return f"mlshift: interrupted: {held} cells cached; rerun to resume"


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommand names of the parser."""
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name in a.choices}


def _error_line(command: str | None, message: str) -> str:
    """The one line every error prints: "mlshift: error: COMMAND: message" (the command
    once, where the message does not start with it already; none before one is parsed)."""
    if command and not (message == command or message.startswith((f"{command}:",
                                                                   f"{command} "))):
        message = f"{command}: {message}"
    return f"mlshift: error: {message}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    _interrupt.seen, _interrupt.cells = False, None
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints escaped
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # a replaced or closed stream
            pass
    try:
        previous = signal.signal(signal.SIGINT, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    command = None  # every error line names it: "mlshift: error: detect: ..."
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            try:
                parser = build_parser()
                given = sys.argv[1:] if argv is None else argv
                command = next((a for a in given if not a.startswith("-")), None)
                if command not in _commands(parser):  # a type check fails during parsing
                    command = None
                args, extra = parser.parse_known_args(argv)
                command = args.command
                if extra:
                    raise ConfigError(f"unrecognized arguments: {' '.join(extra)} "
                                      f"(`mlshift {command} --help` lists its options)")
                for name in PATH_OPTIONS:
                    value = getattr(args, name, None)
                    if value is not None and not value.strip():
                        raise ConfigError(f"--{name.replace('_', '-')}: expected a path, "
                                          "found an empty string")
                    if value is not None:
                        _check_path(args, name, value)
                if args.func is not cmd_bench:  # the bench reports compile times: no cache
                    compile_cache.enable(datasets.cache_dir("jax"))
                args.func(args)
            except MlshiftError as e:
                print(_error_line(command, _one_line(e)), file=sys.stderr)
                return EXIT_USAGE
            except OSError as e:  # an unwritable --out / --save, a full disk
                where = f"{e.filename}: " if e.filename else ""
                print(_error_line(command, f"{where}{_one_line(e.strerror or e)}"),
                      file=sys.stderr)
                return EXIT_USAGE
            except SystemExit as e:  # --help, --version
                return e.code if isinstance(e.code, int) else 0
    except Interrupted as e:
        print(f"mlshift: interrupted: {e.cached} cells cached; rerun to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(_interrupted_line(), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if _interrupt.seen:  # swallowed somewhere (a callback, a __del__): still an interrupt
        print(_interrupted_line(), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
