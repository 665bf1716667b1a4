"""Every built-in config (configs/) runs shrunk; invalid configs are
rejected by key."""

import ast
import dataclasses
import importlib
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
import yaml

import iterjax as ij
from iterjax.experiments.common import deq_models
from iterjax.lab import config as cfglib
from iterjax.lab import registry
from iterjax.lab.cli import main
from iterjax.lab.config import CONFIG_DIR
from iterjax.lab.runner import prepare, run_experiment
from iterjax.lab.spec import Stop

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_configs_and_each_names_a_registered_experiment():
    assert CONFIGS
    for path in CONFIGS:
        text = path.read_text()
        assert text.startswith("#"), f"{path.name} must start with a comment header"
        name = cfglib.read_config(path)["experiment"]  # `base:` resolved
        assert name in registry.EXPERIMENTS


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_smoke_runs(path, tmp_path):
    run_dir, summary = run_experiment(path, out=tmp_path, smoke=True, quiet=True)
    for name in ["config.yaml", "metrics.jsonl", "summary.json"]:
        assert (run_dir / name).exists(), name
    assert list(run_dir.glob("*.png")), "no plot written"
    rows = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    # The resolved config is itself a valid config, the one that ran.
    again = prepare(run_dir / "config.yaml")
    assert again.name == summary["experiment"]
    assert again.cfg == prepare(path, smoke=True).cfg
    SMOKE_CHECKS.get(path.stem, lambda s: None)(summary)
    for claim in smoke_claims(path.read_text()):
        claim.check(summary)


# A config header states what its smoke run gives, one claim a line:
#   # Smoke: EXPR in LO..HI
# EXPR is a value of the summary, or the ratio of two: `name.key` follows dicts,
# `rows[k=v, ...].key` takes the one row of the list `rows` whose k is v.
_CLAIM = re.compile(r"^# Smoke: (.+) in (\S+)\.\.(\S+)$", re.M)
_TERM = re.compile(r"^(\w+)(?:\[([^\]]*)\])?((?:\.\w+)*)$")


class Claim:
    def __init__(self, expr, lo, hi):
        self.expr, self.lo, self.hi = expr, float(lo), float(hi)
        self.terms = [t.strip() for t in expr.split(" / ")]
        assert 1 <= len(self.terms) <= 2 and all(map(_TERM.match, self.terms)), expr

    def value(self, summary):
        values = [_lookup(summary, t) for t in self.terms]
        return values[0] if len(values) == 1 else values[0] / values[1]

    def check(self, summary):
        value = self.value(summary)
        assert self.lo <= value <= self.hi, f"{self.expr} = {value}, header: {self}"

    def __str__(self):
        return f"{self.lo:g}..{self.hi:g}"


def smoke_claims(text):
    return [Claim(*m.groups()) for m in _CLAIM.finditer(text)]


def _lookup(summary, term):
    name, select, path = _TERM.match(term).groups()
    node = summary[name]
    if select is not None:
        # k=v pairs split at the commas outside parentheses (labels hold some)
        pairs = re.split(r",(?![^()]*\))", select)
        want = dict(p.split("=", 1) for p in map(str.strip, pairs))
        match = [r for r in node if all(str(r[k]) == v for k, v in want.items())]
        assert len(match) == 1, f"{term}: {len(match)} rows match"
        node = match[0]
    for key in filter(None, path.split(".")):
        node = node[key] if key in node else node[int(key)]  # JSON's keys are str
    return float(node)


def test_smoke_claims_are_parsed_and_checked():
    text = "# x\n# Smoke: rows[a=1, b=x].v / top.k in 2..3\n# Smoke: top.k in 0..1\n"
    ratio, plain = smoke_claims(text)
    summary = {
        "rows": [{"a": 1, "b": "x", "v": 5.0}, {"a": 2, "b": "x"}],
        "top": {"k": 2},
    }
    assert ratio.value(summary) == 2.5
    ratio.check(summary)
    with pytest.raises(AssertionError, match="top.k = 2.0"):
        plain.check(summary)
    with pytest.raises(AssertionError, match="0 rows match"):
        Claim("rows[a=3].v", 0, 1).check(summary)


def test_some_configs_state_smoke_claims():
    # the configs whose headers carry checked claims about their smoke runs
    stated = {p.stem for p in CONFIGS if smoke_claims(p.read_text())}
    assert {
        "fixed_point_study",
        "krylov_recycle",
        "elk_ar_gru",
        "halpern_vs_picard",
        "sinkhorn_newton",
        "bradley_terry",
        "picard_diffusion",
    } <= stated


def _check_jacobi_rnn(summary):
    rows = summary["rows"]
    assert rows and all(r["converged"] and r["error"] < 1e-6 for r in rows), rows
    sweeps = {(r["cell"], r["length"], r["method"]): r["sweeps"] for r in rows}
    for (cell, T, m), n in sweeps.items():
        assert n <= T
        if m == "deer":
            assert n < sweeps[(cell, T, "jacobi")]


def _check_deer_gru(summary):
    lazy = {(r["method"], r["jacobian_every"]): r for r in summary["lazy"]}
    assert all(r["converged"] and r["error"] < 1e-5 for r in lazy.values())
    for m in ("deer", "quasi_deer"):
        assert lazy[(m, 3)]["jacobians"] < lazy[(m, 1)]["jacobians"]
        # every sweep linearises but the last (it tests the last update)
        assert lazy[(m, 1)]["jacobians"] == lazy[(m, 1)]["sweeps"] - 1
    assert all(r["converged"] and r["error"] < 1e-5 for r in summary["long"])
    assert all(r["converged"] for r in summary["chaotic"])
    train = summary["train"]
    assert train["loss_gap"] < 1e-6
    assert (train["data"], train["length"]) == ("GunPoint", 32)  # a real UCR series
    assert 1 <= min(train["deer_sweeps"]) <= max(train["deer_sweeps"]) <= 32
    assert set(train["epoch_seconds"]) == {"lax.scan", "DEER"}


def _check_fixed_point_study(summary):
    rows = {(r["problem"], r["solver"].split("(")[0]): r for r in summary["rows"]}
    slow = {k[1]: v for k, v in rows.items() if k[0] == "slow_system"}
    assert slow["anderson"]["f_evals"] < slow["picard"]["f_evals"]
    assert slow["newton"]["converged"] and slow["newton"]["jvps"] > 0
    assert {"halpern", "restarted", "lazy_newton"} <= set(slow)
    for (p, s), r in rows.items():
        assert r["converged"], (p, s)
        assert r["f_evals"] == r["steps"] + 1 or s in ("newton", "lazy_newton")
    grads = summary["gradients"]
    assert grads["implicit"]["rel_err"] < 1e-8
    assert grads["implicit(linear_solver=richardson)"]["rel_err"] < 1e-7
    assert grads["unrolled"]["rel_err"] < 1e-8
    assert 0 < grads["phantom(steps=1)"]["cosine"] < 1 - 1e-6


def _check_picard_diffusion(summary):
    for r in summary["rows"]:
        assert r["converged"] and r["error"] < 1e-3 and r["sweeps"] < r["steps"], r
        # the smoke run takes ParaDiGMS's rule: the loop's own passes and evaluations
        assert r["acceptance"] == "paradigms"
        assert r["sweeps"] == r["paradigms_passes"], r
        assert r["evaluations"] == r["paradigms_evaluations"], r
    guide = summary["guidance"]
    assert guide["grad_rel_error"] < 1e-7
    assert guide["loss_last"] < guide["loss_first"]


def _check_picard_diffusion_trained(summary):
    for r in summary["rows"]:
        assert r["converged"] and r["error"] < 1e-3 and r["sweeps"] <= r["steps"], r
        # parallel samples score as the sequential ones they equal to 1e-3
        assert abs(r["sw"] - r["sequential_sw"]) < 1e-2, r
    assert {r["sampler"] for r in summary["rows"]} == {"ddim", "plms", "dpm_solver_pp"}


def _check_diffusion_restoration(summary):
    check = summary["gradient_check"]
    assert check["rel_to_lax_scan"] < 1e-9 and check["rel_to_fd"] < 1e-4, check
    assert summary["losses"][-1] < summary["losses"][0]


def _check_diffusion_inversion(summary):
    rows = {r["method"]: r for r in summary["rows"]}
    for method in ("fixed_point", "anderson", "newton"):
        assert rows[method]["converged"], rows[method]
        # a solved inversion reconstructs far better than DDIM's approximation
        assert rows[method]["reconstruction_rms"] < rows["ddim"]["reconstruction_rms"]
    assert rows["newton"]["jvps_per_image"] > 0 == rows["anderson"]["jvps_per_image"]
    # RNRI: one evaluation and one VJP an iteration, one more evaluation a step
    rnri = rows["rnri"]
    assert rnri["evaluations_per_image"] == rnri["jvps_per_image"] + rnri["steps"], rnri


def _check_bilevel_many_minimisers(summary):
    for r in summary["rows"]:  # V-PBGD reaches its penalised problem's solution
        assert r["error"] <= 1.01 * r["floor"] + 1e-9, r
    # the plane of minimisers makes implicit CG's system inconsistent: reported
    # (NaN at CG's exact breakdown; rounding may leave it finite, not converged)
    assert not summary["implicit_at_least_norm"]["converged"]


def _check_fpdm(summary):
    sizes = {r["model"]: r for r in summary["sizes"]}
    deq = sizes.pop("fixed point (DEQ)")
    for explicit in sizes.values():  # one implicit layer against several
        assert deq["parameters"] < explicit["parameters"], (deq, explicit)
    for r in summary["rows"]:
        assert r["iterations"] == r["budget"] * 8, r  # the budget is spent exactly


def _check_rti_policy(summary):
    assert {(r["variant"], r["k"]) for r in summary["rows"]} == {
        ("full", 4),
        ("cold", 1),
        ("rti", 1),
        ("cold", 2),
        ("rti", 2),
    }
    for r in summary["rows"]:
        assert np.isfinite(r["relative_cost"]) and r["relative_cost"] > 0, r


def _check_charlm_train(summary):
    assert summary["sample_equals_sequential"]
    assert summary["sample_calls"] <= summary["sample_tokens"]


def _check_jacobi_decoding(summary):
    for r in summary["before"] + summary["after"]:
        assert r["exact_match"] == 1.0 and 1 <= r["tokens_per_call"], r
    assert set(summary["chain"]) == {"sequential", "sjd"}
    for q in [summary["greedy_quality_before"], summary["greedy_quality_after"]]:
        assert 0 < q["distinct_4"] <= 1 and 0 < q["top_token_share"] <= 1
    assert all(0 < r["distinct_4"] <= 1 for r in summary["sampling"])


def _check_deq_digits(summary):
    rows = {r["model"]: r for r in summary["rows"]}
    assert rows["mlp"]["params"] >= rows["deq_contractive"]["params"]
    assert rows["deq_contractive"]["converged"] == 1.0  # a contraction by design
    assert not any(r["diverged"] for r in rows.values())


def _check_deq_mnist1d(summary):
    rows = {r["model"]: r for r in summary["rows"]}
    # MNIST-1D's 40-sample signals are the input (the digits have 64 pixels)
    assert rows["deq_contractive"]["params"] == deq_models.deq_params(8, 40)
    assert not any(r["diverged"] for r in rows.values())


def _check_deq_memory(summary):
    assert summary["memory_growth"]["implicit"] < 1.1
    assert summary["memory_growth"]["unrolled"] > 1.2
    # the explicit network stores its K layers' weights: it grows, the DEQ does not
    assert summary["memory_growth"]["explicit"] > 2
    assert list(summary["implicit_vs_explicit"].values())[-1] < 0.5
    grads = summary["gradients"]
    assert grads["finite_difference"]["rel_err"] < 1e-5
    assert grads["unrolled"]["rel_err"] < 1e-6


def _check_deq_solvers(summary):
    forward = {r["solver"]: r for r in summary["forward"]}
    assert forward["anderson"]["mean_steps"] <= forward["picard"]["mean_steps"]


def _check_hpo_ridge(summary):
    rows = {(r["method"], r["budget"]): r for r in summary["rows"]}
    assert rows[("implicit_cg", 16)]["rel_err"] < 1e-10  # exact after dim steps
    assert rows[("implicit_cg", 2)]["rel_err"] > rows[("implicit_cg", 16)]["rel_err"]
    assert rows[("penalty", 100)]["hvps"] == 0
    assert summary["tuning"]["val_loss_last"] < summary["tuning"]["val_loss_first"]


def _check_hyperparameters_at_scale(summary):
    # one decay per parameter; the reference is a converged CG solve; CG's
    # hypergradient improves with its budget and costs one HVP a step (and one
    # for the residual); tuning lowers the validation loss
    assert summary["hyperparameters"] == summary["parameters"] == 64 * 16 + 16 + 170
    assert summary["reference_converged"] and summary["lambda_max"] > 0
    rows = {(r["method"], r["budget"]): r for r in summary["rows"]}
    assert rows["cg", 20]["rel_err"] < rows["cg", 5]["rel_err"] < 1.0
    assert rows["cg", 5]["hvps"] <= 6 and rows["mfac", 8]["hvps"] <= 2
    curve = summary["tuned"]["cg"]["curve"]
    assert curve[-1] < curve[0] and 0 < summary["tuned"]["cg"]["test_acc"] <= 1


def _check_data_hypercleaning(summary):
    rows = {r["solver"]: r for r in summary["rows"]}
    assert set(rows) >= {"implicit", "saba"}
    for r in rows.values():  # better than chance (10 classes), weights moved
        assert 0.15 < r["best_acc"] <= 1.0 and 0.0 < r["caught"] <= 1.0, r
    assert summary["oracles_to_baseline_best"]["implicit"] is not None
    # The baseline reaches its own final loss; the per-solver sweep metrics are
    # numbers (or None: not reached).
    assert summary["oracles_to_baseline_loss"]["implicit"] is not None
    for name in rows:
        assert summary["metrics"][f"{name}.best_acc"] == rows[name]["best_acc"]
        assert f"{name}.to_loss" in summary["metrics"]


def _check_hpo_logreg(summary):
    rows = {r["solver"]: r for r in summary["rows"]}
    # Every solver, even on the smoke budget, improves on the untuned penalties
    # (the inner problem solved at theta0).
    for r in rows.values():
        assert r["best_test_loss"] < r["untuned_test_loss"] and r["seconds"] > 0, r


def _check_fixed_point_sweep(summary):
    assert summary["vectorised_groups"] == 2 and not summary["failed"]
    steps = {
        (a["settings"]["solver"]["name"], a["settings"]["radius"]): a["steps"]["mean"]
        for a in summary["aggregates"]
    }
    assert steps[("picard", 0.9)] > steps[("picard", 0.5)]
    assert steps[("anderson", 0.9)] < steps[("picard", 0.9)]


def _check_hpo_sweep(summary):
    assert summary["vectorised_groups"] == 1 and summary["members"] == 4
    assert not summary["failed"] and not summary["nonfinite_metrics"]
    for a in summary["aggregates"]:  # better than the uninformed log(2)
        assert a["test_loss"]["max"] < 0.69 and a["test_acc"]["min"] > 0.5, a


def _check_halpern_vs_picard(summary):
    rows = {(r["n"], r["solver"]): r for r in summary["rows"]}
    for (n, solver), r in rows.items():
        assert r["converged"] == (solver != "halpern (textbook)"), (n, solver)
    for n in {n for n, _ in rows}:
        restarted = rows[(n, "halpern (restarted)")]["operator_calls"]
        assert restarted < 0.5 * rows[(n, "picard")]["operator_calls"]
    savings = summary["vr_savings"]
    ns = sorted(savings, key=int)
    assert savings[ns[-1]] > 2 * savings[ns[0]] and savings[ns[-1]] > 2.0, savings
    last = summary["infeasible"][-1]
    assert last["drifting"] and last["restarted_halpern_residual"] < 1e-4
    assert last["halpern_residual"] < last["picard_normalised"]


def _check_warmstart_sequence(summary):
    rows = {r["chain"]: r for r in summary["rows"]}
    for label, r in rows.items():
        assert r["converged"] == ("real-time" not in label), label
    for solver, saving in summary["savings"].items():
        assert saving > 1.2, (solver, saving)
        assert rows[f"{solver}, warm"]["max_error"] < 1e-3


def _check_sinkhorn_newton(summary):
    for r in summary["rows"]:
        assert r["converged"] and r["marginal_error"] < 1e-9, r
    assert summary["smallest_epsilon"]["iterations"] > 5, summary["smallest_epsilon"]


def _check_bradley_terry(summary):
    for r in summary["rows"]:
        assert r["converged"] and r["max_difference"] < 1e-7, r
    for density, ratio in summary["zermelo_over_newman"].items():
        assert ratio > 3, (density, ratio)


def _check_sor_bandit(summary):
    rows = {r["policy"]: r for r in summary["rows"]}
    random = rows["uniformly random ω"]["total_iterations"]
    for name in ("exp3 (plain)", "squarecb (contextual)"):
        assert rows[name]["total_iterations"] < random, name
    best = rows["best fixed ω (hindsight)"]["total_iterations"]
    assert rows["per-instance best ω"]["total_iterations"] <= best


def _check_krylov_recycle(summary):
    assert {r["solver"] for r in summary["rows"]} == {"recycled CG", "GCRO-DR"}
    for r in summary["rows"]:
        assert r["converged"] and r["max_difference"] < 1e-6, r
        assert r["saving"] > 1.0, r  # fewer products than the same solver alone


def _check_multigrid_poisson(summary):
    # every 3-D solve converged, and its true residual (recomputed by the
    # experiment) is within the tolerance: the honest counts the header quotes
    rows = summary["rows"]
    assert rows and {r["n"] for r in rows} == {15}
    for r in rows:
        assert r["converged"] and r["residual"] <= 1e-8 * (1 + 1e-6), r


SMOKE_CHECKS = {
    "multigrid_poisson": _check_multigrid_poisson,
    "krylov_recycle": _check_krylov_recycle,
    "sor_bandit": _check_sor_bandit,
    "sinkhorn_newton": _check_sinkhorn_newton,
    "bradley_terry": _check_bradley_terry,
    "warmstart_sequence": _check_warmstart_sequence,
    "halpern_vs_picard": _check_halpern_vs_picard,
    "hpo_sweep": _check_hpo_sweep,
    "fixed_point_sweep": _check_fixed_point_sweep,
    "hpo_logreg": _check_hpo_logreg,
    "data_hypercleaning": _check_data_hypercleaning,
    "hpo_ridge": _check_hpo_ridge,
    "hyperparameters_at_scale": _check_hyperparameters_at_scale,
    "deq_digits": _check_deq_digits,
    "deq_memory": _check_deq_memory,
    "deq_mnist1d": _check_deq_mnist1d,
    "deq_solvers": _check_deq_solvers,
    "fixed_point_study": _check_fixed_point_study,
    "jacobi_rnn": _check_jacobi_rnn,
    "deer_gru": _check_deer_gru,
    "picard_diffusion": _check_picard_diffusion,
    "picard_diffusion_trained": _check_picard_diffusion_trained,
    "diffusion_restoration": _check_diffusion_restoration,
    "diffusion_inversion": _check_diffusion_inversion,
    "bilevel_many_minimisers": _check_bilevel_many_minimisers,
    "fpdm": _check_fpdm,
    "rti_policy": _check_rti_policy,
    "charlm_train": _check_charlm_train,
    "jacobi_decoding": _check_jacobi_decoding,
}


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("experiment: nope\n", [], "unknown experiment 'nope'"),
        ("experiment: fixed_point_study\ndimm: 3\n", [], "`dimm`: unknown key"),
        (
            "experiment: hpo_logreg\nsolvers: [{name: soba, fresh_batches: true}]\n",
            [],
            "`fresh_batches` is for the solvers with inner loops",
        ),
        ("experiment: fixed_point_study\ndim: three\n", [], "`dim`: expected an int"),
        (
            "experiment: jacobi_rnn\nlengths: [64, 0]\n",
            [],
            r"`lengths\[1\]`: must be >= 1",
        ),
        (
            "experiment: deq_digits\ntrain: {lr: -1.0}\n",
            [],
            r"`train.lr`: must be > 0.0",
        ),
        (
            "experiment: hpo_logreg\nval_fraction: 1.5\n",
            [],
            "`val_fraction`: must be <= 1.0",
        ),
        ("experiment: fixed_point_study\ndim: 3.5\n", [], "`dim`: expected an int"),
        ("experiment: fixed_point_study\natol: yes\n", [], "`atol`: expected a number"),
        (
            "experiment: fixed_point_study\nproblems: [tanh_deq, nope]\n",
            [],
            r"`problems\[1\]`: 'nope' is not one of",
        ),
        (
            "experiment: fixed_point_study\nsolvers: [{name: andersen}]\n",
            [],
            r"`solvers\[0\].name`: unknown solver 'andersen'",
        ),
        (
            "experiment: fixed_point_study\nsolvers: [{name: anderson, histroy: 3}]\n",
            [],
            r"`solvers\[0\].histroy`: unknown option for anderson",
        ),
        (
            "experiment: fixed_point_study\nsolvers: [{name: anderson, history: 0}]\n",
            [],
            r"`solvers\[0\]`: .*history",
        ),
        (
            "experiment: fixed_point_study\nsolvers: [{name: picard, damping: 2.0}]\n",
            [],
            r"`solvers\[0\]`: .*damping",
        ),
        ("experiment: fixed_point_study\n", ["seed=x"], "`seed`: expected an int"),
        ("experiment: fixed_point_study\n", ["nokey=1"], "`nokey`: unknown key"),
        ("experiment: fixed_point_study\n", ["dim"], "key=value"),
        ("dim: 3\n", [], "experiment"),
        (
            "experiment: hpo_sweep\nproblem: data_hypercleaning\n"
            "dataset: breast_cancer\n",
            [],
            "`dataset`: data_hypercleaning is on digits",
        ),
        (
            "experiment: hpo_logreg\nsolvers: [{name: implicit, forcing: ew}]\n",
            [],
            r"`solvers\[0\].forcing`: 'ew' is not one of",
        ),
    ],
)
def test_invalid_configs_are_rejected_by_key(tmp_path, text, overrides, match):
    with pytest.raises(cfglib.ConfigError, match=match):
        prepare(_write(tmp_path, text), overrides)


def test_cli_reports_config_errors_with_exit_code(tmp_path, capsys):
    path = _write(tmp_path, "experiment: fixed_point_study\ndimm: 3\n")
    assert main(["run", str(path), "--out", str(tmp_path)]) == 2
    assert "dimm" in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["list"]) == 0
    assert "fixed_point_study" in capsys.readouterr().out


def test_overrides_reach_nested_specs(tmp_path):
    cfg = prepare(
        CONFIG_DIR / "fixed_point_study.yaml",
        ["solvers=[{name: anderson, history: 3, mixing: 0.5}]", "dim=8"],
    ).cfg
    assert cfg.dim == 8
    solver = registry.build("solver", cfg.solvers[0])
    assert solver.history == 3 and solver.mixing == 0.5


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-9 as a string; configs and overrides take it as a float.
    text = "experiment: fixed_point_study\natol: 1e-9\n"
    cfg = prepare(
        _write(tmp_path, text), ["solvers=[{name: picard, damping: 5e-1}]"]
    ).cfg
    assert cfg.atol == 1e-9
    assert registry.build("solver", cfg.solvers[0]).damping == 0.5
    zero = registry.to_spec(
        "solver", {"name": "anderson", "regularization": "0e0"}, "s"
    )
    assert registry.build("solver", zero).regularization == 0.0
    with pytest.raises(cfglib.ConfigError, match="atol"):
        prepare(_write(tmp_path, "experiment: fixed_point_study\natol: 1e-x\n"))


def test_newton_linear_solver_spec_nests():
    spec = registry.to_spec(
        "solver", {"name": "newton", "linear_solver": {"name": "bicgstab"}}, "s"
    )
    solver = registry.build("solver", spec)
    assert type(solver.linear_solver).__name__ == "BiCGStab"
    with pytest.raises(cfglib.ConfigError, match="unknown linear_solver"):
        registry.to_spec("solver", {"name": "newton", "linear_solver": "lu"}, "s")


def test_preconditioner_specs_nest_in_linear_solvers():
    value = {
        "name": "cg",
        "preconditioner": {"name": "multigrid", "coarsening": "galerkin"},
    }
    spec = registry.to_spec("linear_solver", value, "s")
    assert spec.label == "cg(preconditioner=multigrid(coarsening=galerkin))"
    # an option whose value is a mapping without `name` is data, not a spec
    rule = {"name": "restarted", "solver": "picard", "rule": {"sufficient_decay": 0.5}}
    assert registry.to_spec("solver", rule, "s").label == (
        "restarted(rule={'sufficient_decay': 0.5},solver=picard)"
    )
    assert registry.build("linear_solver", spec) == ij.CG(
        preconditioner=ij.linear.Multigrid(coarsening="galerkin")
    )
    # multigrid as a linear solver (MultigridSolver), its cycle a preconditioner
    cycles = registry.to_spec(
        "linear_solver", {"name": "multigrid", "cycle": {"name": "amg"}}, "s"
    )
    assert registry.build("linear_solver", cycles) == ij.linear.MultigridSolver(
        cycle=ij.linear.SmoothedAggregation()
    )
    jacobi = registry.to_spec(
        "linear_solver", {"name": "gmres", "preconditioner": "jacobi"}, "s"
    )
    assert registry.build("linear_solver", jacobi).preconditioner == (
        ij.linear.JacobiPreconditioner()
    )
    for bad, match in [
        ("ilu", "`s.preconditioner.name`: unknown preconditioner 'ilu'"),
        ({"name": "multigrid", "cycle": "X"}, "`s.preconditioner`: Multigrid: `cycle`"),
        ({"name": "chebyshev", "order": 3}, "`s.preconditioner.order`: unknown option"),
    ]:
        with pytest.raises(cfglib.ConfigError, match=re.escape(match)):
            registry.to_spec(
                "linear_solver", {"name": "cg", "preconditioner": bad}, "s"
            )


@pytest.mark.parametrize(
    "value, match",
    [
        ({"name": "relaxed", "solver": "bogus"}, "s.solver.name`: unknown solver"),
        ({"name": "relaxed", "solver": "picard", "relaxation": -1.0}, "relaxation"),
        (
            {"name": "restarted", "solver": "picard", "rule": {"decay": 0.1}},
            "rule.decay",
        ),
        ({"name": "restarted", "solver": "picard", "rule": 0.5}, "RestartRule"),
        ({"name": "halpern", "contraction": "abc"}, "a number or null"),
        ({"name": "restarted"}, "solver"),
    ],
)
def test_wrapper_specs_are_checked(value, match):
    with pytest.raises(cfglib.ConfigError, match=match):
        registry.to_spec("solver", value, "s")


def test_wrapper_specs_nest():
    value = {
        "name": "safeguarded",
        "solver": {
            "name": "restarted",
            "solver": {"name": "anderson", "history": 3},
            "rule": {"sufficient_decay": "1e-1"},
        },
    }
    solver = registry.build("solver", registry.to_spec("solver", value, "s"))
    assert type(solver).__name__ == "Safeguarded"
    assert solver.solver.rule.sufficient_decay == 0.1
    assert solver.solver.solver.history == 3
    halpern = {"name": "halpern", "restart": None, "contraction": 1.0}
    assert (
        registry.build("solver", registry.to_spec("solver", halpern, "s")).restart
        is None
    )


@pytest.mark.slow
def test_hpo_sweep_vmaps_data_hypercleaning(tmp_path):
    # The hyper-cleaning problem as one vmapped trial per member: better than
    # chance, and the two seeds' minibatch streams differ.
    overrides = [
        "problem=data_hypercleaning",
        "budget=2e4",
        "evals=2",
        "batch=16",
        "sweep={seeds: 2}",
    ]
    path = CONFIG_DIR / "hpo_sweep.yaml"
    _, summary = run_experiment(path, overrides, out=tmp_path, quiet=True)
    assert summary["vectorised_groups"] == 1 and not summary["failed"]
    (agg,) = summary["aggregates"]
    assert agg["n"] == 2 and agg["test_acc"]["min"] > 0.3, agg
    assert agg["test_loss"]["std"] > 0, agg


@pytest.mark.parametrize("name", ["hpo_logreg", "data_hypercleaning"])
def test_bilevel_problems_step_size_unit_bounds_the_inner_hessian(name):
    # `inner_lr` is in units of 1/L: L must bound the full-batch inner Hessian
    # (Böhning's bound) without being loose by more than the class count.
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iterjax.experiments import data_hypercleaning, hpo_logreg

    jax.config.update("jax_enable_x64", True)
    if name == "hpo_logreg":
        cfg = hpo_logreg.Config()
        p, classes = hpo_logreg.problem("breast_cancer", cfg), 2
    else:
        cfg = data_hypercleaning.Config(train_size=300, val_size=100)
        p, classes = data_hypercleaning.problem(cfg, theta0=8.0)[0], 10
    full = jnp.arange(p.n)
    g = lambda w: p.inner(w.reshape(p.w0.shape), p.theta0, full)
    keys = jax.random.split(jax.random.key(0), 3)
    for w in [p.w0] + [0.3 * jax.random.normal(k, p.w0.shape) for k in keys]:
        top = np.linalg.eigvalsh(jax.hessian(g)(w.ravel()))[-1]
        assert top <= p.L * (1 + 1e-12), (top, p.L)
        if not w.any():  # at w = 0 the bound is tight up to the class count
            assert top >= p.L / classes, (top, p.L)


def test_dry_run_validates_and_prints_the_plan_without_running(tmp_path, capsys):
    code = main(["run", "fixed_point_sweep", "--dry-run", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and not any(tmp_path.iterdir())
    assert yaml.safe_load(out)["experiment"] == "fixed_point_sweep"
    assert "# sweep: 160 members in 2 groups" in out and "jax.vmap over" in out


def test_config_help_lists_fields_types_defaults(capsys):
    assert main(["run", "fixed_point_study", "--help", "dim=12"]) == 0
    out = capsys.readouterr().out
    assert "| dim | an int >= 1 | 64 | 12 |" in out
    assert "| solvers | a list, each a solver" in out


def test_out_of_range_values_fail_before_a_run_directory(tmp_path, capsys):
    code = main(["run", "fixed_point_study", "dim=-5", "--out", str(tmp_path)])
    assert code == 2 and not any(tmp_path.iterdir())
    assert "`dim`: must be >= 1, got -5" in capsys.readouterr().err


# --- Stopping options reach the solvers

# A stopping option, wherever it sits in a config: atol, rtol, max_steps,
# max_sweeps and norm; a phase other than the main solve has a `<phase>_stop`
# block (`spec.Stop`), whose keys are named `eval_stop.atol` here.
_STOPPING = re.compile(r"^(?:atol|rtol|max_steps|max_sweeps|norm)$")
_STOP_FIELDS = {f.name for f in dataclasses.fields(Stop)}


def _stopping_keys(tree):
    """The stopping keys of a config mapping, nested mappings included; the
    entries of a list of specs (`{name: ..., ...}`) are a solver's own."""
    if not isinstance(tree, dict):
        return set()
    keys = {k for k in tree if _STOPPING.match(k)}
    for k, v in tree.items():
        if k.endswith("_stop") and isinstance(v, dict):
            keys |= {f"{k}.{f}" for f in v}
        else:
            keys |= _stopping_keys(v)
    return keys


def _field_keys(cls):
    """The stopping keys a Config declares: its stopping fields and the fields
    of its `Stop` blocks."""
    keys = set()
    for f in dataclasses.fields(cls):
        if isinstance(f.default, Stop):
            keys |= {f"{f.name}.{g}" for g in _STOP_FIELDS}
        elif _STOPPING.match(f.name):
            keys.add(f.name)
    return keys


def _attrs(node):
    """The attributes an expression reads: `cfg.atol` gives `atol`,
    `cfg.eval_stop.atol` also `eval_stop.atol`, `cfg.eval_stop.kwargs()` and
    the block itself (`cfg.eval_stop`) every key of the block."""
    out = set()
    if isinstance(node, ast.Attribute) and node.attr.endswith("_stop"):
        out |= {f"{node.attr}.{f}" for f in _STOP_FIELDS}
    for n in ast.walk(node):
        if not isinstance(n, ast.Attribute):
            continue
        out.add(n.attr)
        if isinstance(n.value, ast.Attribute) and n.value.attr.endswith("_stop"):
            block = n.value.attr
            out |= (
                {f"{block}.{f}" for f in _STOP_FIELDS}
                if n.attr == "kwargs"
                else {f"{block}.{n.attr}"}
            )
    return out


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _module_reads(tree):
    """Attribute names that reach a stopping argument of a call in one module:
    as a keyword (`atol=cfg.eval_atol`, `norm=NORMS[cfg.norm]`), or positionally
    into a parameter of the module's own functions with a stopping name
    (`measure(f, cfg.atol)` with `def measure(f, atol)`), directly or through
    a local name bound from it (`tol = cfg.atol`, `for _, tol in [...]`)."""
    params = {}  # function name -> its positional parameter names
    carries = {}  # local name -> the attributes it was bound from
    via = {}  # local name -> the names it was bound from
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)) and hasattr(node, "name"):
            params[node.name] = [a.arg for a in node.args.args]
        bound = []
        if isinstance(node, ast.Assign):
            bound = [(t, node.value) for t in node.targets]
        elif isinstance(node, ast.For):
            bound = [(node.target, node.iter)]
        for target, value in bound:
            for name in _names(target):
                carries.setdefault(name, set()).update(_attrs(value))
                via.setdefault(name, set()).update(_names(value))
    for _ in range(len(via)):  # through names bound from names: `for k, v in d.items()`
        for name, sources in via.items():
            carries[name] |= set().union(*(carries.get(s, set()) for s in sources))
    reach = lambda v: _attrs(v).union(*(carries.get(n, set()) for n in _names(v)))
    reads = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:  # `atol=...`, or `**stop` (a Stop's kwargs)
            if kw.arg is None or _STOPPING.match(kw.arg):
                reads |= reach(kw.value)
        if isinstance(node.func, ast.Name) and node.func.id in params:
            for name, arg in zip(params[node.func.id], node.args):
                if _STOPPING.match(name) or name == "stop" or name.endswith("_stop"):
                    reads |= reach(arg)
    return reads


def _stopping_reads(module):
    """`_module_reads` of `module` and of the experiments' modules it imports."""
    seen, todo, reads = set(), [module.__name__], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = importlib.import_module(name).__file__
        tree = ast.parse(pathlib.Path(source).read_text())
        reads |= _module_reads(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "iterjax.experiments"
            ):
                package = importlib.import_module(node.module)
                for a in node.names:  # `from package import module` or a name
                    sub = f"{node.module}.{a.name}"
                    is_module = hasattr(package, "__path__") and bool(
                        importlib.util.find_spec(sub)
                    )
                    todo.append(sub if is_module else node.module)
    return reads


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_stopping_key_reaches_a_solver_call(path):
    # a key a config sets (or its Config declares) that no solver call reads
    # only changes labels: fixed_point_study's `norm` did, once
    tree = cfglib.read_config(path)  # `base:` resolved
    module = registry.experiment(tree["experiment"])
    keys = _stopping_keys(tree)
    keys |= _field_keys(module.Config)
    missing = keys - _stopping_reads(module)
    assert not missing, f"{path.name}: {sorted(missing)} reach no solver call"


_PHASE_SPELLING = re.compile(r"^\w+_(?:atol|rtol|max_steps|max_sweeps)$")


def _all_keys(tree):
    if isinstance(tree, dict):
        return set(tree).union(*map(_all_keys, tree.values()))
    if isinstance(tree, list):
        return set().union(*map(_all_keys, tree))
    return set()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_stopping_option_has_one_spelling(path):
    # `eval_atol`, `grad_atol`, `chaotic_atol` were five spellings of atol; a
    # phase's rule is now a `<phase>_stop: {atol, rtol, max_steps}` block
    tree = cfglib.read_config(path)  # `base:` resolved
    module = registry.experiment(tree["experiment"])
    names = _all_keys(tree) | {f.name for f in dataclasses.fields(module.Config)}
    assert not {k for k in names if _PHASE_SPELLING.match(k)}


def test_the_stopping_check_sees_a_key_that_reaches_nothing():
    # guards the check above against one that finds every key everywhere
    source = """
def measure(f, atol):
    return ij.scan(f, atol=atol)
ax.set(ylabel=f"|f(y) - y| ({cfg.norm} norm)")
ij.fixed_point(f, y0, max_steps=cfg.max_steps)
measure(f, cfg.atol)
for name, tol in [("a", cfg.eval_stop.atol)]:
    chain(tol)
ij.scan(f, **cfg.chaotic_stop.kwargs("max_sweeps"))
def classify(f, stop):
    return ij.scan(f, **stop.kwargs("max_sweeps"))
classify(f, cfg.train_stop)
ij.fixed_point(f, y0, atol=cfg.grad_stop.atol)
"""
    reads = _module_reads(ast.parse(source))
    assert {"atol", "max_steps"} <= reads
    assert "norm" not in reads and "eval_stop.atol" not in reads  # label; chain
    for block in ("chaotic_stop", "train_stop"):  # **kwargs(); a whole block
        assert {f"{block}.{f}" for f in _STOP_FIELDS} <= reads
    assert "grad_stop.atol" in reads and "grad_stop.max_steps" not in reads
    assert {"atol", "max_steps", "norm"} <= _stopping_reads(
        registry.experiment("fixed_point_study")
    )


def test_a_stop_block_given_in_part_keeps_the_experiments_defaults():
    Config = registry.experiment("deq_solvers").Config
    cfg = cfglib.from_dict(Config, {"eval_stop": {"max_steps": 7}})
    assert cfg.eval_stop == Stop(atol=1e-5, max_steps=7)  # not Stop()'s 1e-6
    assert cfg.eval_stop.kwargs() == {"atol": 1e-5, "rtol": 0.0, "max_steps": 7}
    assert Stop(atol=0.0).kwargs("max_sweeps") == {"atol": 0.0, "rtol": 0.0}
    # any nested block: a partial `train:` keeps the Config's max_steps (50)
    assert cfglib.from_dict(Config, {"train": {"hidden": 4}}).train.max_steps == 50
    for block, error in [
        ({"tol": 1e-3}, "`eval_stop.tol`: unknown key"),
        ({"atol": -1.0}, "`eval_stop.atol`: must be >= 0.0"),
        ({"max_steps": 0}, "`eval_stop.max_steps`: must be >= 1"),
    ]:
        with pytest.raises(cfglib.ConfigError, match=re.escape(error)):
            cfglib.from_dict(Config, {"eval_stop": block})


def test_a_spec_is_built_once_when_validated():
    from iterjax.lab.sweep import replace_dotted

    spec = registry.to_spec("solver", {"name": "anderson", "history": 3}, "solver")
    assert registry.build("solver", spec) is spec.built  # not built again
    assert spec.built.history == 3 and spec == cfglib.Spec("anderson", spec.options)
    # a sweep's traced copy of the spec is a new spec, built from its own values
    swept = replace_dotted(spec, "history", 5)
    assert swept.built is None and registry.build("solver", swept).history == 5


# --- Composition: `base:`


def test_a_config_starts_from_a_base_and_overrides_keys(tmp_path):
    child = tmp_path / "mine.yaml"
    child.write_text("base: fixed_point_study\ndim: 12\nsolvers: [picard]\n")
    mine, base = prepare(child), prepare("fixed_point_study")
    assert mine.name == base.name == "fixed_point_study"
    assert mine.cfg == dataclasses.replace(
        base.cfg, dim=12, solvers=(cfglib.Spec("picard"),)
    )
    # smoke blocks merge key by key: the base's smoke sizes, then the child's
    assert (
        prepare(child, smoke=True).cfg.max_steps
        == prepare("fixed_point_study", smoke=True).cfg.max_steps
    )
    # a chain of files, relative to the file that names them
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.yaml").write_text("base: ../mine.yaml\natol: 1.0e-6\n")
    more = prepare(tmp_path / "sub" / "more.yaml").cfg
    assert (more.dim, more.atol) == (12, 1e-6)


@pytest.mark.parametrize(
    "text, match",
    [
        ("base: fixed_point_study\ndim: -3\n", r"`dim`"),
        ("base: fixed_point_study\ndimm: 3\n", r"`dimm`: unknown key"),
        ("base: no_such_config\n", r"no config file 'no_such_config'"),
        ("base: [a]\n", r"config key `base`: must name a built-in config"),
        ("base: loop.yaml\n", r"`base`: the configs base each other in a cycle"),
    ],
)
def test_a_bad_base_is_rejected_by_key(tmp_path, text, match):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(cfglib.ConfigError, match=match):
        prepare(tmp_path / "loop.yaml")


def test_no_experiment_config_field_is_a_platform_key():
    reserved = {f.name for f in dataclasses.fields(cfglib.Platform)}
    for name in registry.EXPERIMENTS:
        fields = {f.name for f in dataclasses.fields(registry.experiment(name).Config)}
        assert not fields & reserved, (name, fields & reserved)


def test_the_command_line_help_is_whole(capsys):
    # a description that stops mid-list, and options without help, were bugs
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "report on run directories." in out and "Examples: iterjax run" in out
    assert main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--out OUT the folder that holds run directories" in out
    assert "--quiet no progress bars or tables on the terminal" in out


@pytest.mark.slow
def test_sampling_config_finds_the_newest_trained_checkpoint(tmp_path):
    sampling = CONFIG_DIR / "picard_diffusion_trained.yaml"
    with pytest.raises(FileNotFoundError, match="run `iterjax run diffusion_train`"):
        run_experiment(
            sampling, ["checkpoint=latest"], out=tmp_path, smoke=True, quiet=True
        )
    trained, _ = run_experiment(
        CONFIG_DIR / "diffusion_train.yaml", out=tmp_path, smoke=True, quiet=True
    )
    _, summary = run_experiment(
        sampling, ["checkpoint=latest"], out=tmp_path, smoke=True, quiet=True
    )
    assert summary["model"] == str(trained / "checkpoint")


def test_learned_preconditioner_losses_vanish_at_the_inverse_and_are_scale_free():
    import jax
    import jax.numpy as jnp

    from iterjax.experiments import learned_preconditioner as lp
    from iterjax.gallery import Poisson2D

    n = 7
    k = jnp.asarray(ij.gallery.lognormal_coefficient(n, 1.0, 2, 0))[None]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, n, n)))
    op = Poisson2D(k[0])
    dense = jax.vmap(lambda e: op(e.reshape(n, n)).reshape(-1))(jnp.eye(n * n)).T
    inverse = lambda r, log_k: jnp.linalg.solve(dense, r.reshape(-1)).reshape(n, n)
    for kind in ("energy", "residual"):
        loss = lp.loss_function(kind)
        assert abs(float(loss(inverse, (k, x)))) < 1e-10
        scaled = lambda r, log_k: -3.0 * inverse(r, log_k)
        assert abs(float(loss(scaled, (k, x)))) < 1e-10
    # the identity: the energy loss is what a line search along r leaves
    r = op(x[0]).reshape(-1)
    want = 1 - float(r @ r) ** 2 / (float(r @ dense @ r) * float(x[0].reshape(-1) @ r))
    got = float(lp.loss_function("energy")(lambda r, log_k: r, (k, x)))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert lp.dilations(7) == [1, 2, 4, 8, 4, 2, 1]


def test_learned_factor_starts_from_the_scaled_lower_part_and_its_loss_is_lis():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from iterjax.experiments import learned_preconditioner as lp
    from iterjax.experiments.common.digits_diffusion import cast
    from iterjax.gallery import Poisson2D
    from iterjax.linear import cholesky

    n = 7
    k = jnp.asarray(ij.gallery.lognormal_coefficient(n, 1.0, 2, 0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)))
    op = Poisson2D(k)
    A = op.assemble().toarray()
    basis = jnp.eye(n * n).reshape(n * n, n, n)
    matrix = lambda f: np.asarray(jax.vmap(f)(basis)).reshape(n * n, n * n).T
    # at initialisation (last layer zero): L = D^{1/2} (I + strictly lower part
    # of D^{-1/2} A D^{-1/2}), so M = L Lᵀ is symmetric positive definite
    factor = cast(lp.FactorNetwork(4, 3, nnx.Rngs(0)), jnp.float64)(op)
    root = np.sqrt(np.diag(A))
    want = np.diag(root) @ (np.eye(n * n) + np.tril(A / np.outer(root, root), -1))
    np.testing.assert_allclose(matrix(factor.lower_matvec), want, atol=1e-10)
    M = matrix(factor)
    assert np.linalg.eigvalsh((M + M.T) / 2).min() > 0
    # Li et al.'s loss |L Lᵀ x - A x|² / |A x|², here of the IC(0) factor
    ic = lambda op: cholesky.incomplete_cholesky(*cholesky.star(op, n, k.dtype, 2))
    M = matrix(ic(op))
    r = A @ np.ravel(x)
    want = np.sum((M @ np.ravel(x) - r) ** 2) / np.sum(r**2)
    got = float(lp.factor_loss(ic, (k[None], x[None])))
    np.testing.assert_allclose(got, want, rtol=1e-10)
