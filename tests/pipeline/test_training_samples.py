"""Whatever one sample's text raises while it is turned into a training example is that sample's recorded skip."""

from __future__ import annotations

import io
import json
import tarfile

from pipeline.data.loader import Sample, Skipped, TrainingSamples
from student.conversation import messages_from_sample


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_bad_conversations_become_skips_and_good_ones_still_train(tmp_path):
    good = [{"from": "human", "value": "what is a cat?"}, {"from": "gpt", "value": "an animal"}]
    conversations = {
        "000000000": good,
        "000000001": ["not a turn"],  # AttributeError inside the chat code
        "000000002": [good[0], good[0]],  # roles that do not alternate: ValueError
        "000000003": good,
    }
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "text-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, turns in conversations.items():
            _add(tar, f"{key}.json", json.dumps({"id": key, "conversations": turns}).encode())

    def encode(sample: Sample) -> tuple[str, list]:
        return sample.key, messages_from_sample(None, sample.conversations, image=False)

    samples = TrainingSamples(str(shards), None, [], encode)
    items = [samples[row] for row in samples.rows]
    assert [i[0] for i in items if not isinstance(i, Skipped)] == ["000000000", "000000003"]
    reasons = [i.reason for i in items if isinstance(i, Skipped)]
    assert reasons[0].startswith("bad conversation: AttributeError")
    assert reasons[1].startswith("bad conversation: ValueError") and "alternate" in reasons[1]
