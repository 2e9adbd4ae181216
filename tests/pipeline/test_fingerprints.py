"""A teacher whose fingerprint is not the expected one gets the same sentence wherever it is caught."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import DEMO_EXPERIMENT, DEMO_TEACHERS

pytestmark = pytest.mark.timeout(300)

SENTENCE = re.compile(r"teacher 'gen' (?P<where>.+) has fingerprint (?P<found>[0-9a-f]{12})\.\. "
                      r"but (?P<expected_by>.+) expects (?P<expected>[0-9a-f]{12})\.\.; (?P<remedy>.+)")


def test_a_changed_teacher_is_named_in_one_sentence_by_precompute_training_and_verify(store_copy):
    from pipeline.data.errors import UsageError
    from pipeline.data.store import TargetStore
    from pipeline.precompute import check_teacher
    from pipeline.verify import verify_store
    from student.config import load_experiment
    from student.provenance import check_store

    meta = store_copy / "gen" / "zarr.json"
    doc = json.loads(meta.read_text())
    real, spec = doc["attributes"]["teacher_fingerprint"], doc["attributes"]["spec"]
    doc["attributes"]["teacher_fingerprint"] = "0" * 64
    meta.write_text(json.dumps(doc))

    with pytest.raises(UsageError) as precompute:
        check_teacher(TargetStore(str(store_copy)), "gen", spec, real)
    training = [f"data.store={store_copy}", f"data.expected_fingerprints.gen={real}"]
    with pytest.raises(UsageError) as train:
        check_store(load_experiment(str(DEMO_EXPERIMENT), training))
    problems = verify_store(str(store_copy), manifest=str(DEMO_TEACHERS)).problems

    said = {"precompute": str(precompute.value), "train": str(train.value), "verify": problems[0],
            "verify block": problems[1].split(": ", 1)[1]}
    parts = {site: SENTENCE.fullmatch(text) for site, text in said.items()}
    assert all(parts.values()), said
    assert parts["precompute"]["where"] == parts["train"]["where"] == f"in store {store_copy}"
    assert [parts[site]["found"] for site in ("precompute", "train", "verify")] == ["0" * 12] * 3
    assert parts["verify block"]["found"] == real[:12] and parts["verify block"]["expected"] == "0" * 12
    assert "use a new --store" in parts["precompute"]["remedy"]
    assert "data.accept_fingerprint_mismatch=true" in parts["train"]["remedy"]
    assert problems[1].startswith("gen block 0: ") and "pipeline precompute" in parts["verify block"]["remedy"]
    # The flag the training remedy names is honoured.
    check_store(load_experiment(str(DEMO_EXPERIMENT), [*training, "data.accept_fingerprint_mismatch=true"]))
