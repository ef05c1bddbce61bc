"""llama.cpp --kl-divergence-base files as a source: layout, targets, errors, compare."""

from __future__ import annotations

import numpy as np
import pytest

import engine
import engine.reference as R
from engine.errors import XentInputError
from engine.io import open_source
from tests.datagen import write_dataset
from tests.llamakld import quantise, write_kld


def _file(tmp_path, rng, n_ctx=16, n_vocab=37, n_chunk=3, name="base.kld"):
    rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
    logits = (rng.standard_normal((rows, n_vocab)) * 4).astype(np.float32)
    logits[0, 5] = -40.0  # below the 16-nat floor: q = 0
    tokens = rng.integers(0, n_vocab, n_chunk * n_ctx).astype(np.int32)
    path = tmp_path / name
    deq, targets = write_kld(path, logits, tokens, n_ctx)
    return str(path), logits, deq, targets, tokens


@pytest.mark.parametrize("n_vocab", [37, 38])  # odd vocabularies carry one pad value a row
def test_rows_dequantise_and_predict_the_next_token(tmp_path, rng, n_vocab):
    path, logits, deq, targets, tokens = _file(tmp_path, rng, n_vocab=n_vocab)
    src = open_source(path, keep=("chunk", "position"))
    assert src.files[0].format == "llama-kld"
    assert src.num_rows == 3 * 7 and src.num_classes == n_vocab
    got = np.concatenate([c.logits for c in src.iter_chunks(chunk_rows=5)])
    np.testing.assert_array_equal(got, deq)  # bit for bit: scale·q + min_log_prob in float32
    tg = np.concatenate([c.target for c in src.iter_chunks(chunk_rows=4)])
    np.testing.assert_array_equal(tg, targets)
    # row j of chunk i is position 8 + j and predicts tokens[16 i + 8 + j + 1]
    keep = np.concatenate(
        [
            np.column_stack([c.keep[n].to_numpy() for n in ("chunk", "position")])
            for c in src.iter_chunks()
        ]
    )
    assert keep[0].tolist() == [0, 8] and keep[7].tolist() == [1, 8]
    assert tg[7] == tokens[16 + 8 + 1]
    # the floor: 16 nats under the top log-prob, within half a quantisation step elsewhere
    lp = logits - (
        logits.max(1, keepdims=True)
        + np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    )
    top = lp.max(1, keepdims=True)
    above = lp > top - 16
    step = (logits.max(1) - np.maximum(logits.min(1), logits.max(1) - 16)) / 65535
    assert np.all(np.abs(deq - lp)[above] <= (0.5 * step[:, None] + 1e-5).repeat(n_vocab, 1)[above])
    assert deq[0, 5] == pytest.approx(top[0, 0] - 16, abs=1e-4)


def test_quantiser_matches_the_known_rounding():
    x = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
    scale, mlp, q = quantise(x)
    assert scale[0] == np.float32(3.0) / np.float32(65535)
    assert q.tolist() == [[0, 21845, 43690, 65535]]


def test_eval_and_compare_read_it(tmp_path, rng):
    path, logits, deq, targets, _ = _file(tmp_path, rng, n_chunk=4)
    d = engine.evaluate(path).to_dict()
    expect = -np.mean(R.row_stats(deq, targets)["target_logprob"])
    assert d["rows"] == 28 and d["nll"] == pytest.approx(expect, rel=1e-5)
    noisy = logits + rng.standard_normal(logits.shape).astype(np.float32) * 0.2
    cand = write_dataset(tmp_path / "cand.parquet", noisy, targets)
    c = engine.compare(path, cand).to_dict()
    e = R.compare_rows(deq, noisy, targets)
    assert c["kl"]["mean"] == pytest.approx(e["kl"].mean(), rel=1e-5)
    assert c["kl"]["min"] >= 0  # renormalised by softmax: never negative
    assert c["base"]["nll"] == pytest.approx(-e["logp_base"].mean(), rel=1e-5)


def test_truncated_and_foreign_files(tmp_path, rng):
    path, *_ = _file(tmp_path, rng)
    data = open(path, "rb").read()
    short = tmp_path / "short.kld"
    short.write_bytes(data[:-10])
    with pytest.raises(XentInputError, match=r"truncated.*row 20 is incomplete"):
        open_source(str(short))
    long = tmp_path / "long.kld"
    long.write_bytes(data + b"\0" * 6)
    with pytest.raises(XentInputError, match="bytes after the last row"):
        open_source(str(long))
    bad = tmp_path / "bad.kld"
    bad.write_bytes(b"_logits_" + np.array([0, 5, 1], "<i4").tobytes())
    with pytest.raises(XentInputError, match="n_ctx 0"):
        open_source(str(bad))
    tiny = tmp_path / "tiny.kld"
    tiny.write_bytes(b"_logits_\x01")
    with pytest.raises(XentInputError, match="header"):
        open_source(str(tiny))
