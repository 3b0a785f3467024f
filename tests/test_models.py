"""Model name resolution: alias, local folder, hub id only with permission."""

import pytest

from tirforge.agent.models import ModelNotFoundError, cache_dir, resolve_model


def test_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="No model folder"):
        resolve_model("./does/not/exist")


def test_hub_id_needs_permission(monkeypatch):
    with pytest.raises(ModelNotFoundError, match="--allow-network"):
        resolve_model("Qwen/Qwen2.5-Math-1.5B-Instruct")
    # Even when allowed, HF_HUB_OFFLINE (set for all tests) keeps it local.
    with pytest.raises(ModelNotFoundError):
        resolve_model("Qwen/Qwen2.5-Math-1.5B-Instruct", allow_network=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("Qwen/Qwen2.5-Math-1.5B-Instruct", allow_network=True) == (
        "Qwen/Qwen2.5-Math-1.5B-Instruct"
    )


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("TIRFORGE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "models"
