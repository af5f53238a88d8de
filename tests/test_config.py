from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oddeye.config import ConfigError, demo_config_path, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_is_valid_and_embedded() -> None:
    cfg = load_config(demo_config_path())
    assert cfg.model.name == "padim"
    assert cfg.sources[0].type == "synthetic"
    assert cfg.ray.address is None  # empty RAY_ADDRESS means a local Ray
    assert demo_config_path().read_text() == (REPO / "configs" / "demo.yaml").read_text()


def test_misspelled_key_names_the_field_and_allowed(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["sources"][0]["fpss"] = raw["sources"][0].pop("fps")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "sources.0.fpss" in msg and "unknown field" in msg
    assert "fps" in msg.split("allowed here:")[1]


def test_bad_values_name_the_path() -> None:
    with pytest.raises(ConfigError, match=r"batching\.max_batch_size"):
        parse_config({"sources": [{"type": "synthetic"}], "batching": {"max_batch_size": 0}})
    with pytest.raises(ConfigError, match=r"sources\.0.*'kafkaa'|sources\.0.*tag"):
        parse_config({"sources": [{"type": "kafkaa"}]})
    with pytest.raises(ConfigError, match=r"model.*unknown model 'padimm'"):
        parse_config({"sources": [{"type": "synthetic"}], "model": {"name": "padimm"}})
    with pytest.raises(ConfigError, match=r"backbon.*allowed:.*backbone"):
        parse_config({"sources": [{"type": "synthetic"}], "model": {"params": {"backbon": "x"}}})
    with pytest.raises(ConfigError, match=r"sources: required field is missing"):
        parse_config({})
    with pytest.raises(ConfigError, match=r"model\.device"):
        parse_config({"sources": [{"type": "synthetic"}], "model": {"device": "gpu0"}})
    with pytest.raises(ConfigError, match=r"model.*float16 is for CUDA"):
        parse_config({"sources": [{"type": "synthetic"}], "model": {"device": "cpu", "precision": "float16"}})


def test_env_expansion_and_defaults() -> None:
    raw = {"sources": [{"type": "video", "path": "${VID}"}], "metrics": {"port": "${PORT:-9200}"}}
    cfg = parse_config(raw, env={"VID": "/data/a.mp4"})
    assert cfg.sources[0].path == "/data/a.mp4"
    assert cfg.metrics.port == 9200
    with pytest.raises(ConfigError, match=r"sources\.0\.path: environment variable VID is not set"):
        parse_config(raw, env={})


def test_set_overrides_by_path_and_index() -> None:
    raw = {"sources": [{"type": "synthetic"}, {"type": "synthetic", "camera_id": "b"}]}
    cfg = parse_config(raw, ["sources.1.fps=2.5", "model.params.n_features=10", "alerts.cameras={b: {threshold: 0.8}}"])
    assert cfg.sources[1].fps == 2.5
    assert cfg.model.params["n_features"] == 10
    assert cfg.alerts.policy_for("b")["threshold"] == 0.8
    assert cfg.alerts.policy_for("a")["threshold"] == 0.5
    with pytest.raises(ConfigError, match="not an index"):
        parse_config(raw, ["sources.5.fps=1"])
    with pytest.raises(ConfigError, match="PATH=VALUE"):
        parse_config(raw, ["sources.0.fps"])


def test_duplicate_camera_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="camera_id synthetic-0 used by more than one"):
        parse_config({"sources": [{"type": "synthetic"}, {"type": "synthetic"}]})


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
