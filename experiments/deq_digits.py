"""DEQ classifiers on sklearn's digits (or MNIST-1D) against an explicit net of
equal size.

Each `Variant` (a contractive DEQ, an unconstrained DEQ with the Jacobian penalty,
one with fixed-point correction, an MLP with the DEQ's parameter count ...) is
trained with the same data, optimiser and budget. Recorded per epoch: train loss,
test accuracy, mean forward solver steps (train and test), the fraction of solves
that converged, the Jacobian penalty, ms per training step. Plots: test accuracy
and forward steps against epochs.
"""

import dataclasses

import matplotlib.pyplot as plt
import numpy as np

from iterjax.experiments.common import deq_models as dm
from iterjax.lab.config import Spec
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    train: dm.TrainConfig = dm.TrainConfig()
    models: tuple[dm.Variant, ...] = (
        dm.Variant("deq_contractive"),
        dm.Variant("deq_dense", cell="dense"),
        dm.Variant("deq_jacreg", cell="dense", jac_reg=1.0),
        dm.Variant(
            "deq_correction", cell="dense", correction=3, adjoint=Spec("phantom")
        ),
        dm.Variant("mlp", kind="mlp"),
    )


def run(cfg: Config, workdir) -> dict:
    histories, rows = {}, []
    total = len(cfg.models) * cfg.train.epochs
    with workdir.progress(total, "training") as advance:
        for v in cfg.models:
            model, hist = dm.train(v, cfg.train, workdir.log, advance, workdir.shard)
            histories[v.label] = hist
            rows.append(summarise(v, model, hist))
    plot(histories, workdir, f"deq_{cfg.train.dataset}.png", cfg.train.dataset)
    return {"rows": rows, "table": table(rows)}


def summarise(v, model, hist):
    last = hist[-1]
    # Epoch 1 includes compilation; time the rest.
    ms = np.median([h["ms_per_step"] for h in hist[1:]] or [last["ms_per_step"]])
    return dict(
        model=v.label,
        params=dm.num_params(model),
        test_acc=last["test_acc"],
        best_test_acc=max(h["test_acc"] for h in hist),
        test_steps=last["test_steps"],
        train_steps_first=hist[0].get("train_steps", 0.0),
        train_steps_last=last.get("train_steps", 0.0),
        converged=last.get("train_converged", 1.0),
        diverged=not np.isfinite(last["train_loss"]),
        skipped=last.get("skipped", 0),
        ms_per_step=float(ms),
    )


def plot(histories, workdir, name, dataset="digits"):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        a1.plot(epochs, [100 * h["test_acc"] for h in hist], label=label)
        if "train_steps" in hist[0]:
            a2.plot(epochs, [h["train_steps"] for h in hist], label=label)
    a1.set(xlabel="epoch", ylabel="test accuracy (%)", title=dataset)
    accs = [100 * h["test_acc"] for hist in histories.values() for h in hist]
    a1.set_ylim(max(0, min(accs) - 2), min(100, max(accs) + 2))  # all the data
    a2.set(xlabel="epoch", ylabel="mean forward solver steps", title="solver cost")
    for a in (a1, a2):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    workdir.savefig(fig, name)


def table(rows):
    headers = [
        "model",
        "params",
        "test acc",
        "best",
        "forward steps (test)",
        "train steps first -> last",
        "steps skipped (NaN gradient)",
        "ms/step",
    ]
    return markdown_table(
        headers,
        [
            [
                r["model"],
                r["params"],
                f"{100 * r['test_acc']:.1f}%",
                f"{100 * r['best_test_acc']:.1f}%",
                f"{r['test_steps']:.1f}",
                f"{r['train_steps_first']:.1f} -> {r['train_steps_last']:.1f}",
                r["skipped"],
                f"{r['ms_per_step']:.1f}",
            ]
            for r in rows
        ],
    )
