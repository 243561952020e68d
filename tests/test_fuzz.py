"""Property-based fuzzing of every file kind Moka reads (a bounded run; see fuzz_campaign.py).

Hypothesis draws mutations of the shipped models' files (prototxts, binary and HDF5
caffemodels, solverstates, mean binaryprotos, LMDB Datum records, HDF5 data files, image lists
and images). The contract: the case works, or fails with a MokaError that names the file, the
layer or the blob; never another exception, never more than 10 seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from fuzz_campaign import CASE_SECONDS, FUZZ_MEMORY_LIMIT, KINDS, Seeds, classify, mutate_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.net import memory_limit

OPS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 1 << 30),
                         st.integers(0, 1 << 30)), min_size=1, max_size=3)
EXAMPLES = 30  # per file kind: about 300 cases, ~10-20 s on a loaded 2-core machine


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    return Seeds(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=EXAMPLES, deadline=CASE_SECONDS * 1000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(variant=st.integers(0, 1 << 16), ops=OPS)
def test_mutated_files_work_or_fail_with_a_located_moka_error(seeds, kind, variant, ops):
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(dir=seeds.root, prefix="case"))
    os.chdir(seeds.root)
    try:
        with memory_limit(FUZZ_MEMORY_LIMIT):
            outcome = classify(seeds, (kind, variant, ops), work)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    assert outcome.kind in ("ok", "clear"), f"{outcome.kind}: {outcome.detail}"


@given(ops=OPS)
@settings(max_examples=50, deadline=None, database=None, derandomize=True)
def test_text_mutations_stay_text(ops):
    text = (Path(__file__).resolve().parent.parent / "models/lenet/lenet.prototxt").read_text()
    assert isinstance(mutate_text(text, ops), str)
