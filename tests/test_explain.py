"""`xent explain` reproduces the numbers people ask about (tests/../shared seeds) and
agrees with PyTorch on every option it explains."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from engine.commands import main
from engine.explain import explain, fmt, fmt_vec


def torch_loss(x, target=None, probs=None, **kw):
    xt = torch.tensor([x], dtype=torch.float64)
    if probs is not None:
        return F.cross_entropy(xt, torch.tensor([probs], dtype=torch.float64), **kw).item()
    return F.cross_entropy(xt, torch.tensor([target]), **kw).item()


# -- the seeds -----------------------------------------------------------------------


def test_one_hot_prediction_is_not_zero():
    """'Why is CrossEntropyLoss([0, 0, 0, 1], 3) 0.7437 and not 0?'"""
    ex = explain([0, 0, 0, 1], 3)
    assert ex.loss == pytest.approx(0.7437, abs=5e-5)
    assert ex.loss == pytest.approx(torch_loss([0, 0, 0, 1], 3), rel=1e-12)
    text = ex.render()
    assert "loss = -x[class] + log Σ_j exp(x_j)" in text
    assert "= -1 + log(e^0 + e^0 + e^0 + e^1)" in text
    assert "= -1 + 1.7437" in text
    assert "= 0.7437" in text
    assert "[0.1749, 0.1749, 0.1749, 0.4754]" in text  # softmax
    assert "-log(0.4754)" in text
    # the same numbers as probabilities: -log p[3] = -log 1 = 0, and why
    assert ex.alternatives["probs"] == 0.0
    assert ex.alternatives["log_probs"] == -1.0
    assert "applies softmax" in text and "--input-kind probs" in text
    assert "bits" in text and fmt(0.7437 / math.log(2)) in text


def test_seed_random_row():
    x = [0.3367, 0.1288, 0.2345, 0.2303, -1.1229]
    ex = explain(x, 0)
    assert fmt(ex.loss) == "1.3472"
    assert ex.loss == pytest.approx(torch_loss(x, 0), rel=1e-12)
    text = ex.render()
    assert "-0.3367 + log(e^0.3367 + e^0.1288 + e^0.2345 + e^0.2303 + e^(-1.1229))" in text
    assert "= -0.3367 + 1.6839" in text and "= 1.3472" in text


def test_seed_nll_vs_cross_entropy():
    ex = explain([3, 1, -3], 1)
    assert fmt(ex.loss) == "2.1291"
    assert fmt_vec(ex.softmax) == "[0.8789, 0.1189, 0.0022]"
    assert fmt_vec(ex.log_softmax) == "[-0.1291, -2.1291, -6.1291]"
    text = ex.render()
    assert "[0.8789, 0.1189, 0.0022]" in text and "2.1291" in text
    assert "NLLLoss(log_softmax(x), y)" in text
    # NLLLoss of the log-softmax gives the same number
    nll = explain(ex.log_softmax, 1, input_kind="log_probs")
    assert nll.loss == pytest.approx(ex.loss, rel=1e-12)


# -- the other input kinds and options against torch ------------------------------------


def test_probs_and_log_probs_kinds():
    p = [0.1, 0.2, 0.7]
    ex = explain(p, 2, input_kind="probs")
    assert ex.loss == pytest.approx(-math.log(0.7))
    assert "-log(0.7000)" in ex.render()
    lp = [math.log(v) for v in p]
    ex = explain(lp, 2, input_kind="log-probs")
    t = F.nll_loss(torch.tensor([lp], dtype=torch.float64), torch.tensor([2])).item()
    assert ex.loss == pytest.approx(t)
    assert "not log-probabilities" not in ex.render()
    assert "not log-probabilities" in explain([0, 0, 0, 1], 3, input_kind="log_probs").render()


@pytest.mark.parametrize(
    "kw",
    [
        {"label_smoothing": 0.1},
        {"weight": [1.0, 2.0, 3.0, 4.0]},
        {"weight": [1.0, 2.0, 3.0, 4.0], "label_smoothing": 0.3},
    ],
)
def test_options_match_torch(kw):
    x = [0.5, -1.0, 2.0, 0.25]
    ex = explain(x, 1, **kw)
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.tensor(tkw["weight"], dtype=torch.float64)
    assert ex.loss == pytest.approx(torch_loss(x, 1, **tkw), rel=1e-12)
    assert fmt(ex.loss) in ex.render()


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_probability_targets(eps):
    x, t = [3.0, 1.0, -3.0], [0.1, 0.9, 0.0]
    ex = explain(x, target_probs=t, label_smoothing=eps)
    assert ex.loss == pytest.approx(torch_loss(x, probs=t, label_smoothing=eps), rel=1e-12)
    text = ex.render()
    assert "-Σ_c t" in text and fmt(ex.loss) in text


def test_long_rows_are_abbreviated():
    ex = explain(list(range(40)), 3)
    text = ex.render()
    assert "…" in text and "(40 terms)" in text
    assert ex.loss == pytest.approx(torch_loss(list(range(40)), 3), rel=1e-12)


def test_to_dict_is_json():
    d = explain([0, 0, 0, 1], 3).to_dict()
    s = json.dumps(d, allow_nan=False)
    back = json.loads(s)
    assert back["loss"] == pytest.approx(0.7437, abs=5e-5)
    assert back["as_input_kind"]["probs"] == 0.0
    assert back["softmax"][3] == pytest.approx(0.4754, abs=5e-5)
    assert back["steps"] and back["notes"]


@pytest.mark.parametrize(
    "args, kw, match",
    [
        (([0, 1], 2), {}, "out of range"),
        (([0, 1], None), {}, "give a target"),
        (([0, 1], 0), {"target_probs": [0.5, 0.5]}, "give a target"),
        (([0, 1], None), {"target_probs": [1.0]}, "expected 2"),
        (([0, 1], 0), {"weight": [1.0]}, "2 classes"),
        (([0, 1], 0), {"label_smoothing": 1.5}, "label_smoothing"),
        (([], 0), {}, "at least one"),
    ],
)
def test_errors(args, kw, match):
    with pytest.raises(ValueError, match=match):
        explain(*args, **kw)


# -- the command ----------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_explain_seed():
    r = run("explain", "--logits", "0,0,0,1", "--target", "3")
    assert r.exit_code == 0, r.output
    assert "0.7437" in r.stdout and "-1 + log(e^0 + e^0 + e^0 + e^1)" in r.stdout


def test_cli_explain_forms_and_json():
    r = run("explain", "--logits=[3, 1, -3]", "--target", "1", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert round(d["loss"], 4) == 2.1291
    r = run("explain", "--logits", "-1,2,3", "--target", "0", "--input-kind", "log-probs")
    assert r.exit_code == 0, r.output
    r = run(
        "explain", "--logits", "3,1,-3", "--target-probs", "0.1,0.9,0", "--label-smoothing", "0.2"
    )
    assert r.exit_code == 0, r.output
    assert "t' = (1-ε)·t + ε/C" in r.stdout
    r = run("explain", "--logits", "0.5,0.5", "--target", "0", "--weight", "1,3")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "--logits", "0,0,0,1"],
        ["explain", "--logits", "0,0,0,1", "--target", "7"],
        ["explain", "--logits", "a,b", "--target", "0"],
        ["explain", "--logits", "0,1", "--target", "0", "--label-smoothing", "2"],
        ["explain", "--logits", "0,1", "--target", "0", "--input-kind", "softmax"],
    ],
)
def test_cli_explain_errors(args):
    r = run(*args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
