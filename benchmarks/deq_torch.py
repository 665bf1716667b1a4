"""The torchdeq side of benchmarks/deq.py; runs in its own venv (.venv-torch).

    python benchmarks/deq_torch.py INPUT.npz SETTINGS.json OUTPUT.json

INPUT.npz holds the data, the batch order of every epoch and the initial weights
written by benchmarks/deq.py; the model, solver and tolerances are the ones
iterjax uses there. Writes per-step times, forward function evaluations and the
test accuracy after the budget.
"""

import json
import sys
import time

import numpy as np
import torch
from torch import nn
from torchdeq import get_deq


class ContractiveCell(nn.Module):
    """z -> tanh(A z + U x + b), A = W γ / max(|W|_inf, γ): ContractiveDense."""

    def __init__(self, w, u_w, u_b, gamma):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.u = nn.Linear(u_w.shape[1], u_w.shape[0])
        with torch.no_grad():
            self.u.weight.copy_(torch.tensor(u_w))
            self.u.bias.copy_(torch.tensor(u_b))
        self.gamma = gamma
        self.calls = 0

    def forward(self, z, x):
        if not torch.is_grad_enabled():
            self.calls += 1  # the forward solver runs under no_grad
        norm = self.w.abs().sum(dim=1).max()
        a = self.w * (self.gamma / torch.clamp(norm, min=self.gamma))
        return torch.tanh(z @ a.T + self.u(x))


class Model(nn.Module):
    def __init__(self, params, s):
        super().__init__()
        self.cell = ContractiveCell(
            params["w"], params["u_w"], params["u_b"], s["gamma"]
        )
        self.head = nn.Linear(s["hidden"], params["head_w"].shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(params["head_w"]))
            self.head.bias.copy_(torch.tensor(params["head_b"]))
        self.hidden = s["hidden"]
        self.deq = get_deq(
            f_solver="anderson",
            f_max_iter=s["f_max_iter"],
            f_tol=s["f_tol"],
            f_stop_mode="abs",
            b_solver="fixed_point_iter",
            b_max_iter=s["b_max_iter"],
            b_tol=s["b_tol"],
            ift=True,
        )
        self.solver_kwargs = {"m": s["history"]}

    def forward(self, x):
        z0 = torch.zeros(x.shape[0], self.hidden)
        z_out, info = self.deq(
            lambda z: self.cell(z, x), z0, solver_kwargs=self.solver_kwargs
        )
        return self.head(z_out[-1]), info


def main(npz, settings, out):
    data = np.load(npz)
    s = json.loads(open(settings).read())
    torch.manual_seed(0)
    model = Model(data, s)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    xtr, ytr = torch.tensor(data["xtr"]), torch.tensor(data["ytr"]).long()
    times, nfe, losses = [], [], []
    for epoch_order in data["orders"]:
        model.train()
        for idx in epoch_order:
            idx = torch.tensor(idx).long()
            start = time.perf_counter()
            model.cell.calls = 0
            opt.zero_grad()
            logits, _ = model(xtr[idx])
            loss = nn.functional.cross_entropy(logits, ytr[idx])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
            nfe.append(model.cell.calls)
            losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        logits, _ = model(torch.tensor(data["xte"]))
        acc = float((logits.argmax(-1).numpy() == data["yte"]).mean())
    result = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        step_seconds=times,
        forward_nfe=nfe,
        losses=losses,
        test_acc=acc,
    )
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
