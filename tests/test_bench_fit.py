"""`jmmkv bench --max-length`: the byte-size parser, the search over estimated peaks, the estimates
of the tiny preset and the command end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jmmkv import arguments, bench_fit, cli

MiB = 2**20
# A decoder whose KV cache outweighs its activations (2 layers, 2 KV heads of 512 dims, D=32), so
# that compressing lets longer prompts fit: the command runs on it as the "tiny" preset.
KV_HEAVY = dict(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=32,
  num_layers=2,
  num_heads=2,
  num_kv_heads=2,
  head_dim=512,
)
# The prompt length at which the command's limit lies between Full's peak and SnapKV's: its searches
# then probe buckets up to 256 tokens (from 256, up to 512: twice the compile time).
PIVOT = 128


@pytest.mark.parametrize(
  "text, want",
  [
    ("2GiB", 2 << 30),
    ("512MiB", 512 << 20),
    ("64 KiB", 64 << 10),
    ("1.5gib", 3 << 29),
    ("100B", 100),
    ("1073741824", 1 << 30),
    ("1TiB", 1 << 40),
    ("1e3MiB", 1000 << 20),
  ],
)
def test_byte_size_reads_binary_suffixes(text, want):
  assert arguments.byte_size(text, "--max-length") == want


@pytest.mark.parametrize(
  "text",
  ["2GB", "2G", "abc", "", "GiB", "-1GiB", "0", "0.5B", "nanMiB", "infGiB", "1e400", "2 GiB x"],
)
def test_byte_size_refuses_other_values_naming_the_flag(text):
  with pytest.raises(ValueError, match=r"^--max-length must be a size of at least one byte"):
    arguments.byte_size(text, "--max-length")


def _oracle(peak, limit, max_length, step=32):
  """The longest grid length with every grid length up to it fitting (brute force)."""
  best = None
  for n in range(step, max_length // step * step + 1, step):
    if peak(n) > limit:
      break
    best = n
  return best


def _bucket_peaks(seed: int):
  """A peak per length as the library's: any level per bucket (not growing with it), growing
  inside a bucket, and with some buckets lower at their last length (Full's layout)."""
  rng = np.random.default_rng(seed)
  base = {1 << k: rng.uniform(1, 100) * 2**k for k in range(5, 16)}
  slope = {t: rng.uniform(0, 3) for t in base}
  dip = {t: rng.uniform(0, 50) * t * (rng.random() < 0.5) for t in base}

  def peak(n: int) -> float:
    t = max(32, 1 << (n - 1).bit_length())
    return base[t] + slope[t] * n - (dip[t] if n == t else 0)

  return peak


@pytest.mark.parametrize("seed", range(40))
def test_longest_fit_finds_the_longest_length_every_shorter_one_fitting(seed):
  peak = _bucket_peaks(seed)
  rng = np.random.default_rng(1000 + seed)
  max_length = int(rng.choice([1 << 15, 20000, 4096]))
  limit = float(rng.uniform(peak(32), 2 * max(peak(n) for n in range(32, max_length, 32))))
  calls = []
  got = bench_fit.longest_fit(lambda n: calls.append(n) or peak(n), limit, max_length)
  want = _oracle(peak, limit, max_length)
  assert got is not None and got[0] == want
  assert got[1] == (want == max_length // 32 * 32)  # capped: the search bound itself fits
  assert len(set(calls)) <= 50  # not a scan of the grid


def test_longest_fit_edges():
  linear = lambda n: 1000 + 10 * n
  assert bench_fit.longest_fit(linear, 1000 + 10 * 5000, 1 << 20) == (4992, False)
  assert bench_fit.longest_fit(linear, 1000 + 10 * 32, 1 << 20) == (32, False)
  assert bench_fit.longest_fit(linear, 1000 + 10 * 31, 1 << 20) is None  # not even 32 tokens
  assert bench_fit.longest_fit(linear, 1e12, 1000) == (992, True)  # the bound (on the grid) fits
  assert bench_fit.longest_fit(linear, 1e12, 31) is None


def _kv_heavy_model():
  import jmmkv
  from jmmkv.models.configs import tiny_decoder

  return jmmkv.random_model(tiny_decoder(**KV_HEAVY), seed=0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """`jmmkv bench --max-length` (on `KV_HEAVY`), with a limit between Full's estimated peak at
  `PIVOT` tokens and SnapKV's: its JSON and printed table."""
  import contextlib
  import io

  model = _kv_heavy_model()
  peak = lambda spec, r: bench_fit.Estimator(model, spec, r, 1, 2, bench_fit.Compiled())(PIVOT)
  full, snapkv = (
    peak("full", None).peak_bytes,
    max(peak("snapkv", r).peak_bytes for r in (0.5, 0.1)),
  )
  assert snapkv < full  # at one length, compressing needs less (kept slots, not the prompt's)
  out = tmp_path_factory.mktemp("fit") / "fit.json"
  argv = ["bench", "--preset", "tiny", "--max-length", str((full + snapkv) // 2)]
  argv += ["--policies", "snapkv,full", "--budgets", "0.5,0.1", "--max-new-tokens", "2"]
  printed = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
    mp.setitem(bench_fit.PRESETS, "tiny", KV_HEAVY)
    assert cli.main(argv + ["--check-length", "64", "--out", str(out)]) == 0
  return json.loads(out.read_text()), printed.getvalue()


def test_cli_writes_each_rows_longest_length_and_a_measured_check(fitted):
  result, printed = fitted
  meta, rows = result["meta"], result["rows"]
  assert [(r["policy"], r["budget"]) for r in rows] == [
    ("full", 1.0),
    ("snapkv", 0.5),
    ("snapkv", 0.1),
  ]  # Full first: the ratios are to it
  assert meta["config"] == KV_HEAVY and meta["preset"] == "tiny"
  assert meta["peak_memory"] == "process peak RSS (VmHWM)" and meta["compilations"] >= 1
  assert 0 < meta["param_bytes"] < meta["limit_bytes"]
  for r in rows:
    assert r["max_length"] % 32 == 0 and not r["capped"]
    assert r["peak_bytes"] <= meta["limit_bytes"] < r["next_peak_bytes"]
    assert r["next_length"] == r["max_length"] + 32
    assert r["peak_bytes"] == max(r["stages"].values()) and r["peak_stage"] in r["stages"]
    assert r["max_length_vs_full"] == r["max_length"] / rows[0]["max_length"]
    check = r["check"]
    assert check["length"] == 64 and 0 < check["estimated_bytes"] < r["peak_bytes"]
    assert isinstance(check["measured_bytes"], int) and check["measured_bytes"] >= 0
  assert "max T" in printed and "meas/est" in printed and "wrote" in printed


def test_search_result_fits_and_the_next_length_does_not(fitted):
  """Against fresh estimates: each row's length fits the limit, the next grid length does not."""
  result, _ = fitted
  model, limit = _kv_heavy_model(), result["meta"]["limit_bytes"]
  for r in result["rows"]:
    ratio = None if r["policy"] == "full" else r["budget"]
    est = bench_fit.Estimator(model, r["policy"], ratio, 1, 2, bench_fit.Compiled())
    n = r["max_length"]
    assert est(n).peak_bytes == r["peak_bytes"] <= limit < est(n + 32).peak_bytes


def test_full_fits_the_shortest_and_a_smaller_budget_no_shorter(fitted):
  lengths = {(r["policy"], r["budget"]): r["max_length"] for r in fitted[0]["rows"]}
  assert lengths["full", 1.0] < PIVOT <= lengths["snapkv", 0.5] <= lengths["snapkv", 0.1]


def test_a_limit_below_the_shortest_prompt_is_one_error_line(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(bench_fit.PRESETS, "tiny", KV_HEAVY)
  out = tmp_path / "fit.json"
  argv = ["bench", "--preset", "tiny", "--max-length", "1MiB", "--policies", "full,snapkv"]
  assert cli.main(argv + ["--budgets", "0.5", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jmmkv: error: --max-length 1.0 MiB is below the estimated peak of the ")
  assert re.search(
    r"shortest prompt \(32 tokens\) with full: [0-9.]+ MiB, [0-9.]+ [KM]iB of it param", err
  )
  assert len(err.strip().splitlines()) == 1 and not out.exists()


def _no_run(*args, **kwargs):
  raise AssertionError("the work started before the arguments were checked")


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--max-length", "2GB"], "--max-length must be a size of at least one byte"),
    (["--max-length", "1GiB", "--lengths", "64"], "--lengths and --max-length exclude each other"),
    (["--max-length", "1GiB", "--compare-hf"], "--compare-hf times decoding"),
    (["--max-length", "1GiB", "--max-search-length", "16"], "--max-search-length must be >= 32"),
    (["--max-length", "1GiB", "--check-length", "-1"], "--check-length must be >= 0"),
    (["--max-length", "1GiB", "--budgets", "2"], "(0, 1]"),
  ],
)
def test_bad_arguments_fail_before_any_work(monkeypatch, capsys, flags, message):
  monkeypatch.setattr(bench_fit, "run", _no_run)
  assert cli.main(["bench", "--preset", "tiny", *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jmmkv: error:") and message in err and len(err.strip().splitlines()) == 1
