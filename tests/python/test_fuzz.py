"""Random configurations of every entry point (scripts/fuzz.py: shapes, dtypes, masks,
score modifiers, layouts, caches, gradients) against that script's own float64 reference,
a fresh seed per run (printed on failure: `python3 scripts/fuzz.py --seed S` replays it).
The dense cases' logits are kept to a spread of 100 here: at ~1000, fp32 logits carry
rounding of the size of the script's fp32 tolerance (the script's own runs go there)."""
import importlib.util
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location("fuzz", pathlib.Path(__file__).parents[2] / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

KINDS = {"dense": fuzz.fuzz_dense, "varlen": fuzz.fuzz_varlen, "sparse": fuzz.fuzz_sparse,
         "kvcache": fuzz.fuzz_kvcache, "sdpa": fuzz.fuzz_sdpa}
CASES = 20  # per kind and device: ~5 s on two cores for all five kinds


@pytest.mark.parametrize("kind", list(KINDS))
def test_random_configurations(device, rng, kind, monkeypatch):
    monkeypatch.setattr(fuzz, "DEV", device)
    monkeypatch.setattr(fuzz, "MAX_SPREAD", 100.0)
    for i in range(CASES):
        desc, errs, bad = KINDS[kind](rng)
        assert not bad, f"{kind} case {i} of seed {rng.initial_seed()}: {desc}, errors {errs}"
