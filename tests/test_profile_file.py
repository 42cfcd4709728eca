import json

import numpy as np
import pytest

from baklava.errors import ProfileError
from baklava.eviction import EvictionConfig
from baklava.profiles.head_scores import HeadScores
from baklava.profiles.profile_file import SCHEMA_VERSION, BudgetProfile, ModelInfo, config_fingerprint
from tests.conftest import tiny_config


def make_profile(**cfg):
    info = ModelInfo.from_config(tiny_config(**cfg), "tiny")
    scores = HeadScores(np.array([[0.1, 0.5], [0.9, 0.3]]), np.array([0.2, 0.01]), raw={"note": "x"})
    return BudgetProfile(
        info,
        scores,
        EvictionConfig(sink=2, window=8),
        np.array([[10, 20], [40, 30]]),
        {"method": "baklava", "budget": "0.3"},
    )


def test_roundtrip(tmp_path):
    p = make_profile()
    path = p.save(tmp_path / "p.json")
    q = BudgetProfile.load(path, expect_fingerprint=config_fingerprint(tiny_config()))
    np.testing.assert_array_equal(q.capacities, p.capacities)
    np.testing.assert_allclose(q.scores.kv_head, p.scores.kv_head)
    assert q.eviction == p.eviction and q.model == p.model and q.allocation == p.allocation
    assert q.total_tokens == 100 and q.kv_bytes(batch=2, dtype_bytes=2) == 100 * 2 * 16 * 2 * 2
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temporary file left


def test_fingerprint_depends_on_architecture_only():
    assert config_fingerprint(tiny_config()) == config_fingerprint(tiny_config())
    assert config_fingerprint(tiny_config()) != config_fingerprint(tiny_config(num_key_value_heads=4))


def _edit(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_rejects_corruption(tmp_path):
    path = make_profile().save(tmp_path / "p.json")
    _edit(path, lambda d: d["capacities"][0].__setitem__(0, 11))
    with pytest.raises(ProfileError, match="checksum mismatch"):
        BudgetProfile.load(path)


def test_rejects_other_schema(tmp_path):
    path = make_profile().save(tmp_path / "p.json")
    _edit(path, lambda d: d.__setitem__("schema_version", SCHEMA_VERSION + 1))
    with pytest.raises(ProfileError, match="schema version"):
        BudgetProfile.load(path)


def test_rejects_other_model(tmp_path):
    path = make_profile(hidden_size=128).save(tmp_path / "p.json")
    with pytest.raises(ProfileError, match="made for model 'tiny'"):
        BudgetProfile.load(path, expect_fingerprint=config_fingerprint(tiny_config()))


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"schema_version": 1}'])
def test_rejects_garbage(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProfileError):
        BudgetProfile.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        BudgetProfile.load(tmp_path / "nope.json")


def test_capacity_shape_checked():
    info = ModelInfo.from_config(tiny_config(), "tiny")
    with pytest.raises(ProfileError, match="shape"):
        BudgetProfile(info, HeadScores.constant(2, 2), capacities=np.ones((3, 2)))
