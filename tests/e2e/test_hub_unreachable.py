"""Without a network, a name that is no local folder must not cost huggingface_hub's retries
(~49 s a lookup, two minutes and more for a model: its files one by one): minillm_cli/hub.py
tries one connection first and switches the Hub libraries to offline mode, so a model in the
local Hub cache loads at once and a missing one fails at once. The Hub here is a closed local
port (HF_ENDPOINT), so the test is the same with or without a network."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from minillm_cli import hub


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*hub._OFFLINE_VARS, *hub._PROXY_VARS)}
    return dict(env, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")


def _cache(tmp_path, folder, repo: str) -> None:
    """`folder` as the Hub cache holds a downloaded repo: refs/main -> snapshots/<commit>/."""
    root = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / "c0ffee")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("c0ffee")


def test_a_cached_hub_model_loads_and_a_missing_one_fails_at_once(tmp_path, tiny_dir, dolly_like):
    _cache(tmp_path, tiny_dir / "student", "someone/tiny")
    run = [sys.executable, "-m", "minillm_cli", "evaluate", "--data", str(dolly_like), "--metric", "lm-loss",
           "--limit", "2", "--quiet"]
    t0 = time.perf_counter()
    ok = subprocess.run([*run, "--model", "someone/tiny"], capture_output=True, text=True, env=_env(tmp_path),
                        timeout=300)
    missing = subprocess.run([*run, "--model", "someone/absent"], capture_output=True, text=True,
                             env=_env(tmp_path), timeout=300)
    elapsed = time.perf_counter() - t0
    assert ok.returncode == 0, ok.stderr
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "'someone/absent': not a local folder, and the Hugging Face Hub is unreachable" in missing.stderr
    assert "Retrying" not in ok.stderr + missing.stderr
    assert elapsed < 60  # (two process starts; the retries alone took > 100 s)


@pytest.fixture()
def attempts(monkeypatch) -> list:
    """The connections hub.check_reachable tries (each fails), from a clean slate: nothing known,
    no offline or proxy variable set (monkeypatch restores them)."""
    calls = []

    def connect(address, timeout):
        calls.append(address)
        raise OSError("unreachable")

    monkeypatch.setattr(hub.socket, "create_connection", connect)
    monkeypatch.setattr(hub, "_REACHABLE", {})
    for k in (*hub._OFFLINE_VARS, *hub._PROXY_VARS):
        monkeypatch.delenv(k, raising=False)
    return calls


def test_reachability_is_asked_once_and_left_to_the_libraries_behind_a_proxy(monkeypatch, attempts):
    calls = attempts
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.check_reachable() and calls == [] and not hub.offline()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:8443")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (monkeypatch restores it, and the variables)
    if "datasets.config" in sys.modules:
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.setattr(sys.modules["datasets.config"], flag, getattr(sys.modules["datasets.config"], flag))
    assert not hub.check_reachable()
    assert calls == [("mirror.example", 8443)] and hub.offline() and constants.HF_HUB_OFFLINE
    assert not hub.check_reachable() and len(calls) == 1


def test_one_librarys_offline_switch_still_asks_for_the_others(monkeypatch, attempts):
    """HF_DATASETS_OFFLINE=1 alone leaves transformers online, with its ~49 s of retries per model:
    the connection is still tried. HF_HUB_OFFLINE=1 puts everything offline: nothing is tried."""
    calls = attempts
    monkeypatch.setattr(hub, "go_offline", lambda: None)  # (this test's process keeps its settings)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.offline("datasets") and not hub.offline("models") and not hub.offline()
    assert not hub.check_reachable() and len(calls) == 1
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.check_reachable() and len(calls) == 1 and hub.offline("models")
