"""The harness's AutoAttack beside the reference's (torchattacks), per image, on the same weights.

Trains each model with the harness on the dataset's training split (the bench's recipes:
`seed-mlp` lr 0.1, 1 epoch, hidden 200; `mlp-ce` the recipe's defaults; `mlp-ce+adv` the
mlp-ce recipe trained adversarially, PGD-7 at eps 0.1 for twice the recipe's epochs, as
`train --defense adv-train` and the full bench matrix do), ports it to torch
(`torch_peer.ported`: logits checked equal to 1e-4), then for each eps runs on the first n
test images

- the harness's AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square 5,000): twice,
  the second (compiled) call timed;
- torchattacks' ensemble at the same settings (`torch_peer.reference_autoattack`: APGD-CE and
  APGD-T at 100 iterations, FAB-T multi-targeted, Square 5,000 queries, each on the images
  still standing), one call timed,

and writes one row per (model, eps): robust accuracy of each, per-image agreement (the share
of images both call robust or both call broken) and the speed ratio (torchattacks' seconds /
the harness's second call's). torchattacks searches the box [0, 1]; the harness searches
--box: "0-1" (the same box, the default), "model" (the model's own input range, [0.01, 1]
on MNIST, what the bench uses) or "both" (a row for each). Rows are written as they finish
(eps outer, models inner), so an interrupted run leaves the rows it finished.

    MLSHIFT_DATA_DIR=/path/to/mnist python scripts/autoattack_agreement.py \\
        --models seed-mlp mlp-ce mlp-ce+adv --eps 0.1 0.3 --n 1000 --out agreement.md

--out: one or more files, each a .md table or a .json of the rows (with each harness
attack's count of images broken). Needs torch and torchattacks (`make bench-peers`
installs both: the `peers` extra, then torchattacks with --no-deps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from mlshift_jax import api
from mlshift_jax.attacks import autoattack, evasion
from mlshift_jax.bench import torch_peer
from mlshift_jax.core.files import write_text
from mlshift_jax.models.zoo import predict

MODELS = {  # name -> (model, params) trained on ds, the bench's recipes
    "seed-mlp": lambda ds: api.fit("seed-mlp", ds, lr=0.1, epochs=1, hidden=200),
    "mlp-ce": lambda ds: api.fit("mlp-ce", ds),
    "mlp-ce+adv": lambda ds: api.adv_fit("mlp-ce", ds, eps=0.1, steps=7),
}
BOXES = {"0-1": ("0-1",), "model": ("model",), "both": ("0-1", "model")}
COLUMNS = ("model", "eps", "harness box", "n", "clean acc", "harness AA", "torchattacks AA",
           "agreement", "harness s (2nd call)", "harness s (1st call)", "torchattacks s",
           "speed ratio")


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rows_for(name, model, params, x, y, eps: float, boxes, seed: int) -> list[dict]:
    """One row per harness box for `model` at `eps` on x: [n, D], y: [n]."""
    key = evasion.attack_key(seed)
    ref = torch_peer.prepared_autoattack(model, params, x, y, eps)
    adv, t_ref = _timed(ref.run)
    theirs = ref.run.robust(adv)
    clean = float(np.mean(np.argmax(np.asarray(predict(model, params, x)), -1) == y))
    rows = []
    for box in boxes:
        lo, hi = (0.0, 1.0) if box == "0-1" else model.input_range

        def ours(lo=lo, hi=hi):
            r = autoattack.report(model, params, x, y, eps=eps, key=key, lo=lo, hi=hi)
            jax.block_until_ready(r.x_adv)
            return r

        _, t_first = _timed(ours)
        rep, t_second = _timed(ours)
        robust = rep.robust
        rows.append({
            "model": name, "eps": eps, "harness box": f"[{lo:g}, {hi:g}]", "n": len(y),
            "clean acc": clean, "harness AA": float(robust.mean()),
            "torchattacks AA": float(theirs.mean()),
            "agreement": float(np.mean(robust == theirs)),
            "harness s (2nd call)": t_second, "harness s (1st call)": t_first,
            "torchattacks s": t_ref, "speed ratio": t_ref / t_second,
            "harness counts": rep.counts()})
    return rows


def markdown(rows: list[dict], header: str) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [{**r, "eps": f"{r['eps']:g}"} for r in rows]

    lines = [header, "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(path: str, rows: list[dict], facts: dict) -> None:
    if path.endswith(".json"):
        write_text(path, json.dumps({"facts": facts, "rows": rows}, indent=1) + "\n")
    else:
        header = " ".join(f"{k}: {v};" for k, v in facts.items())
        write_text(path, markdown(rows, header))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--eps", nargs="+", type=float, default=[0.1, 0.3])
    ap.add_argument("--n", type=int, default=1000, help="the first n test images")
    ap.add_argument("--box", default="0-1", choices=list(BOXES),
                    help="the harness's search box (torchattacks always searches [0, 1])")
    ap.add_argument("--seed", type=int, default=0, help="the harness's attack key")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--out", nargs="+", required=True,
                    help="FILE.md (a table) and/or FILE.json (the rows, with each harness "
                         "attack's count of images broken)")
    args = ap.parse_args(argv)
    if not torch_peer.torchattacks_available():
        print("needs torch and torchattacks: pip install -e '.[peers]' && "
              "pip install --no-deps torchattacks==3.5.1 (make bench-peers)", file=sys.stderr)
        return 2
    ds = api.load_dataset(args.dataset)
    x, y = np.asarray(ds.x_test[:args.n]), np.asarray(ds.y_test[:args.n])
    facts = {"dataset": args.dataset, "train size": len(ds.y_train),
             "data dir": "MLSHIFT_DATA_DIR" if os.environ.get("MLSHIFT_DATA_DIR") else "bundled",
             "torch": torch_peer.version(), "torch threads": torch_peer.threads(),
             "jax": jax.__version__, "cpu": platform.machine(),
             "load before": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    trained: dict = {}
    rows: list[dict] = []
    for eps in args.eps:
        for name in args.models:
            if name not in trained:
                (model, params), t = _timed(lambda name=name: MODELS[name](ds))
                trained[name] = (model, jax.tree.map(np.asarray, params))
                print(f"{name}: trained in {t:.0f} s", flush=True)
            model, params = trained[name]
            for r in rows_for(name, model, params, x, y, eps, BOXES[args.box], args.seed):
                rows.append(r)
                print(json.dumps(r), flush=True)
            facts["load after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
            for path in args.out:
                write(path, rows, facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
