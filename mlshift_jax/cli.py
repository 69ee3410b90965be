"""Command line: `python -m mlshift_jax <command>` (also installed as `mlshift`).

Every error the harness raises on purpose (MlshiftError) and every bad argument prints one
line to stderr and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import jax
import numpy as np
from tabulate import tabulate

from mlshift_jax import data
from mlshift_jax.errors import ConfigError, MlshiftError

EXIT_USAGE = 2
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message: str):  # noqa: D102
        raise ConfigError(f"{self.prog}: {message}")


def _emit(fmt: str, payload, table_rows=None, headers="keys") -> None:
    if fmt == "json":
        print(json.dumps(payload, indent=2, default=float))
    else:
        print(tabulate(table_rows if table_rows is not None else payload, headers=headers,
                       floatfmt=".4f"))


def _load(args) -> data.Dataset:
    """The dataset the arguments name; then one stderr line saying where the work runs."""
    from mlshift_jax.sharding import describe_devices

    ds = data.load(args.dataset, args.data_dir)
    print(f"mlshift: {ds.name} from {ds.source}; {describe_devices()}", file=sys.stderr)
    return ds


# --- train --------------------------------------------------------------------------------


def cmd_train(args) -> None:
    from mlshift_jax.files import save_params
    from mlshift_jax.metrics import evaluate
    from mlshift_jax.recipes import TrainConfig, fit, get_recipe

    recipe = get_recipe(args.model)
    cfg = TrainConfig(hidden=args.hidden, lr=args.lr, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed)
    if args.defense not in (None, "adv-train"):
        raise ConfigError(f"train --defense: expected adv-train (the training-time defense), "
                          f"found {args.defense!r}; wrap a trained model with attack --defense")
    ds = _load(args)
    x, y = ds.x_train, ds.y_train
    if args.train_size is not None:
        x, y = x[: args.train_size], y[: args.train_size]
    start = time.perf_counter()
    if args.defense == "adv-train":
        from mlshift_jax.defenses import adv_fit

        params = jax.block_until_ready(adv_fit(args.model, cfg, x, y, eps=args.eps,
                                               steps=args.steps, warmup=args.warmup))
    else:
        params = jax.block_until_ready(fit(args.model, cfg, x, y))
    train_seconds = time.perf_counter() - start
    scores = evaluate(recipe.arch, params, ds.x_test, ds.y_test)
    result = {"model": args.model, **scores, "train_seconds": train_seconds,
              "train_size": int(len(y)), "data_source": ds.source,
              "backend": jax.default_backend()}
    if args.defense == "adv-train":  # the robust accuracy it was trained for: PGD-40 at eps
        from mlshift_jax.attacks import attack_key, pgd

        x_adv = pgd(recipe.arch, params, ds.x_test, ds.y_test, eps=args.eps, steps=40,
                    key=attack_key(args.seed), lo=recipe.arch.input_range[0],
                    hi=recipe.arch.input_range[1])
        result.update({"defense": "adv-train", "eps": args.eps, "train_steps": args.steps,
                       "warmup": args.warmup,
                       "pgd40_accuracy": evaluate(recipe.arch, params, x_adv,
                                                  ds.y_test)["accuracy"]})
    if args.save:
        save_params(args.save, {k: np.asarray(v) for k, v in params.items()})
        result["saved"] = args.save
    _emit(args.format, result, [[k, v] for k, v in result.items()], headers=["", "value"])


# --- stability ----------------------------------------------------------------------------


def cmd_stability(args) -> None:
    from mlshift_jax.stability import stability

    ds = _load(args)
    table, seconds = stability(ds, samples=args.samples, size=args.size, hidden=args.hidden,
                               lr=args.lr, epochs=args.epochs or 1, seed=args.seed)
    payload = {"samples": table.to_dict(orient="index"), "train_seconds": seconds,
               "data_source": ds.source}
    _emit(args.format, payload, table.reset_index().values.tolist(),
          headers=["", *table.columns])


# --- attack -------------------------------------------------------------------------------


def cmd_attack(args) -> None:
    from mlshift_jax.attacks import attack_key, get_attack
    from mlshift_jax.files import load_params
    from mlshift_jax.metrics import evaluate
    from mlshift_jax.models import infer_model
    from mlshift_jax.recipes import TrainConfig, fit, get_recipe
    from mlshift_jax.timing import time_call

    attacks = [get_attack(name) for name in args.attack]
    if args.defense is not None:
        from mlshift_jax.defenses import get_defense

        get_defense(args.defense)  # a bad name fails before the data loads
    if (args.params is None) == (args.model is None):
        raise ConfigError("give exactly one of --params FILE.npz or --model NAME")
    ds = _load(args)
    if args.params:
        params = load_params(args.params)
        model = infer_model(params)
    else:
        model = get_recipe(args.model).arch
        params = fit(args.model, TrainConfig(hidden=args.hidden, epochs=args.epochs,
                                             seed=args.seed),
                     ds.x_train, ds.y_train)
    params = jax.device_put({k: jax.numpy.asarray(v, jax.numpy.float32)
                             for k, v in params.items()})
    n = len(ds.y_test) if args.n is None else min(args.n, len(ds.y_test))
    x, y = jax.device_put((ds.x_test[:n], ds.y_test[:n]))
    key = attack_key(args.seed)
    undefended = params
    if args.defense:
        model, params = _defend(args, model, params, ds, key)
    rows = []
    for attack in attacks:
        kw = {"key": key, **({"target": args.target} if attack.targeted else {}),
              **_iterative_kw(args, attack.fn)}
        if attack.name == "transfer" and args.defense == "adv-train":
            kw["source_params"] = undefended
        for eps in args.eps:  # eps is traced: one compile per attack, not per eps
            run = partial(attack.fn, model, params, x, y, eps=eps, **kw)
            timing = time_call(run, rounds=args.rounds)
            scores = evaluate(model, params, run(), y, key=jax.random.fold_in(key, 7))
            rows.append({"attack": attack.name, "eps": eps, **scores,
                         "attack_seconds": timing.median_s, "compile_seconds": timing.compile_s,
                         "n_images": n})
    if args.defense:
        _attack_flags(args, model, params, x, y, key, rows)
        return
    _emit(args.format, rows)


def _iterative_kw(args, fn) -> dict:
    """--steps / --restarts for the attacks that take them."""
    import inspect

    accepted = inspect.signature(fn).parameters
    kw = {}
    if args.steps is not None and "steps" in accepted:
        kw["steps"] = args.steps
    if args.restarts is not None and "restarts" in accepted:
        kw["restarts"] = args.restarts
    return kw


def _defend(args, model, params, ds, key):
    """attack --defense NAME: the model wrapped by the defense (adv-train: retrained)."""
    from mlshift_jax import defenses
    from mlshift_jax.recipes import TrainConfig

    defense = defenses.get_defense(args.defense)
    if defense.kind == "training":
        if args.model is None:
            raise ConfigError("attack --defense adv-train trains the model: give --model NAME "
                              "(a saved adversarially trained model: --params without "
                              "--defense)")
        params = defenses.adv_fit(args.model, TrainConfig(hidden=args.hidden, seed=args.seed,
                                                          epochs=args.epochs),
                                  ds.x_train, ds.y_train, eps=max(args.eps))
        return defenses.build("adv-train", model), params
    state = defenses.fit_state(args.defense, model, ds.x_train, key=key)
    return defenses.build(args.defense, model, state=state), params


def _attack_flags(args, model, params, x, y, key, rows) -> None:
    """The rows plus the obfuscated-gradient flags (obfuscation.py) of the defended model."""
    from mlshift_jax import obfuscation

    accuracy = {(r["attack"], r["eps"]): r["accuracy"] for r in rows}
    k = min(200, int(x.shape[0]))
    probed = obfuscation.probe(model, params, x[:k], y[:k], key=jax.random.fold_in(key, 11),
                               eps=max(args.eps), steps=args.steps or 10)
    raised = obfuscation.flags(accuracy, probed, n=int(x.shape[0]))
    if args.format == "json":
        print(json.dumps({"defense": args.defense, "model": model.name, "rows": rows,
                          "flags": raised}, indent=2, default=float))
        return
    _emit("table", rows)
    print(f"\nflags ({model.name}):" if raised else f"\nflags ({model.name}): none raised")
    for line in raised:
        print(f"  - {line}")


# --- poison -------------------------------------------------------------------------------


def cmd_poison(args) -> None:
    from mlshift_jax import sweeps

    sweeps.config_from(args.kind, {"fraction": args.fraction, "patch": args.patch,  # check
                                   "target": args.target, "mode": args.mode,
                                   "source": args.source})
    ds = _load(args)
    common = dict(model=args.model, seed=args.seed, hidden=args.hidden, epochs=args.epochs,
                  n_train=args.train_size)
    if not args.sweep:
        result = sweeps.poison_one(ds, kind=args.kind, fraction=args.fraction,
                                   patch=args.patch, target=args.target, mode=args.mode,
                                   source=args.source, **common)
        _emit(args.format, result, [[k, v] for k, v in result.items()], headers=["", "value"])
        return
    def log(line: str) -> None:
        print(f"mlshift: {line}", file=sys.stderr)

    tables = sweeps.run_all(ds, badnets_models=(args.model,), log=log, **common)
    found = sweeps.findings(tables)
    if args.format == "json":
        payload = {name: json.loads(t.to_json(orient="records")) for name, t in tables.items()}
        payload["findings"] = json.loads(found.to_json(orient="records"))
        print(json.dumps(payload, indent=2))
    else:
        print(sweeps.markdown(tables, found))


# --- detect -------------------------------------------------------------------------------


def cmd_detect(args) -> None:
    from mlshift_jax.change import CalibrationConfig, check_pair, detect_pair
    from mlshift_jax.files import load_params

    reference, suspect = load_params(args.reference), load_params(args.suspect)
    check_pair(reference, suspect)  # before the data loads: a mismatch is one line
    ds = _load(args)
    config = CalibrationConfig(sample_size=args.sample_size)
    result = detect_pair(reference, suspect, ds, seed=args.seed, alpha=args.alpha, config=config)
    if args.format == "json":
        print(json.dumps(result, indent=2, default=float))
        return
    rows = [[k, result[k]] for k in ("verdict", "p_value", "alpha", "category",
                                     "changed_probability", "architecture") if k in result]
    rows += [[f"fingerprint {k}", v] for k, v in result["fingerprint"].items()
             if k != "transitions"]
    _emit("table", None, rows, headers=["", "value"])


# --- bench --------------------------------------------------------------------------------


def cmd_bench(args) -> None:
    from mlshift_jax import report, runner
    from mlshift_jax.sharding import describe_devices, initialize_distributed

    if args.distributed:
        initialize_distributed()
    matrix = Path(args.matrix) if args.matrix else BENCH_DIR / (
        "matrix-quick.toml" if args.quick else "matrix.toml")
    if not matrix.is_file():
        raise ConfigError(f"matrix file {matrix} not found; pass --matrix PATH")
    out = Path(args.out) if args.out else report.default_out_dir()
    if args.quick and not args.out:
        out = out.with_name(out.name + "-quick")  # never overwrite the committed full results
    print(f"mlshift: bench {matrix} -> {out}; {describe_devices()}", file=sys.stderr)
    start = time.perf_counter()
    records = runner.run(matrix, out_dir=out, only=args.only, force=args.force)
    seconds = time.perf_counter() - start
    if args.only:  # a partial run: show its cells, leave the full tables as they are
        cols = [c for c in ("id", "status", "accuracy", "f1", "median_s") if c in records]
        print(tabulate(records[cols].values.tolist(), headers=cols, floatfmt=".4f"))
        print(f"mlshift: --only: {len(records)} cells in {seconds:.0f} s; tables in {out} "
              "left unchanged (run without --only to rewrite them)", file=sys.stderr)
        return
    if jax.process_index() != 0:  # a multi-host run: process 0 writes the report
        return
    paths = report.write(records, out)
    computed = int((records["status"] == "computed").sum())
    print(f"wrote {len(paths)} files to {out} ({len(records)} cells: {computed} computed, "
          f"{len(records) - computed} reused) in {seconds:.0f} s")


# --- parser -------------------------------------------------------------------------------


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}; got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0; got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from mlshift_jax.recipes import RECIPES

    parser = _Parser(prog="mlshift", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--data-dir", help="folder with MNIST IDX (gz or raw) or CSV files")
    common.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--format", choices=["table", "json"], default="table")
    common.add_argument("--hidden", type=_positive(int), default=200)
    common.add_argument("--epochs", type=_positive(int), default=None)

    p = sub.add_parser("train", parents=[common], help="train one model and score it")
    p.add_argument("--model", default="seed-mlp", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--lr", type=_positive(float), default=None)
    p.add_argument("--batch-size", type=_positive(int), default=None)
    p.add_argument("--train-size", type=_positive(int), default=None,
                   help="train on the first N training images only")
    p.add_argument("--save", help="write the params to this .npz")
    p.add_argument("--defense", choices=["adv-train"], default=None,
                   help="adv-train: PGD adversarial training (Madry et al. 2018)")
    p.add_argument("--eps", type=_positive(float), default=0.1,
                   help="adv-train: the L-inf budget (default 0.1)")
    p.add_argument("--steps", type=_positive(int), default=7,
                   help="adv-train: PGD steps per batch (default 7)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="adv-train: share of training over which eps ramps up from 0 "
                        "(0.5 lets the cnn train at eps 0.3)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("stability", parents=[common],
                       help="E2: models on random training samples, trained as one population")
    p.add_argument("--samples", type=_positive(int), default=10)
    p.add_argument("--size", type=_positive(int), default=10_000)
    p.add_argument("--lr", type=_positive(float), default=0.1)
    # no set_defaults(epochs=1): parsers built from `common` share its actions, so that
    # default leaked into every command (train --model mlp-ce then trained 1 epoch, not 5)
    p.set_defaults(func=cmd_stability)
    p = sub.add_parser("attack", parents=[common],
                       help="E3: attack a model at test time and score it at each eps")
    p.add_argument("--params", help=".npz saved by `train --save`")
    p.add_argument("--model", help="train this recipe first instead of loading --params")
    p.add_argument("--attack", nargs="+", default=["fgsm"])
    p.add_argument("--eps", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--target", type=int, default=3, help="class for targeted attacks")
    p.add_argument("--n", type=_positive(int), default=None, help="attack the first N test images")
    p.add_argument("--rounds", type=_positive(int), default=3, help="timed rounds per cell")
    p.add_argument("--defense", default=None,
                   help="wrap the model first: randomize, quantize, median, denoise-ae, "
                        "adv-train (with --model: trains adversarially at the largest --eps)")
    p.add_argument("--steps", type=_positive(int), default=None,
                   help="steps of the iterative attacks (pgd, eot-pgd, bpda-pgd, transfer)")
    p.add_argument("--restarts", type=_positive(int), default=None,
                   help="random restarts of the adaptive attacks")
    p.set_defaults(func=cmd_attack)
    p = sub.add_parser("poison", parents=[common],
                       help="E4-E7: poison the training data, train, score clean and triggered")
    p.add_argument("--kind", default="mixture", help="clean, wrong-label, trigger or mixture")
    p.add_argument("--fraction", type=float, default=0.1, help="share of eligible samples")
    p.add_argument("--patch", type=_positive(int), default=4, help="trigger side in pixels")
    p.add_argument("--target", type=int, default=3, help="the relabel class (mixture)")
    p.add_argument("--mode", default="uniform", help="wrong-label: uniform, shift or target")
    p.add_argument("--source", type=int, default=None, help="poison only this class")
    p.add_argument("--model", default="seed-mlp", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--train-size", type=_positive(int), default=None,
                   help="train on the first N training images only")
    p.add_argument("--sweep", action="store_true",
                   help="run the study's sweeps (E4-E7 + BadNets) instead of one cell")
    p.set_defaults(func=cmd_poison)

    p = sub.add_parser("detect", parents=[common],
                       help="has the suspect model changed from the reference, and how?")
    p.add_argument("--reference", required=True, help=".npz of the reference model")
    p.add_argument("--suspect", required=True, help=".npz of the model to test")
    p.add_argument("--alpha", type=_positive(float), default=0.05,
                   help="the test's level: its false-positive rate on clean retrains")
    p.add_argument("--sample-size", type=_positive(int), default=10_000,
                   help="training images of each clean retrain in the null; match how the "
                   "reference was trained (p-values assume the reference is such a model)")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("bench", help="run the experiment matrix and write results/<platform>/")
    p.add_argument("--quick", action="store_true", help="the CI-sized matrix")
    p.add_argument("--matrix", help="a matrix TOML file (default bench/matrix.toml)")
    p.add_argument("--only", help="run only the cells whose id matches (glob or substring)")
    p.add_argument("--out", help="output folder (default results/<platform>/)")
    p.add_argument("--force", action="store_true", help="rerun cells even if cached")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run first (jax.distributed.initialize)")
    p.set_defaults(func=cmd_bench)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"mlshift: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            args = build_parser().parse_args(argv)
            args.func(args)
        except MlshiftError as e:
            print(f"mlshift: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as e:  # an unwritable --out / --save, an unreadable file
            print(f"mlshift: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
    return 0
