"""check_resume: a resumed run keeps the settings it was started with, those a record from an
older release lacks included (they ran with that release's behaviour)."""
import json

import pytest

from minillm_cli.config import DataOptions, RunOptions, SFTConfig, check_resume, to_dict
from minillm_cli.errors import InputError


def _sft(out, **data):
    return SFTConfig(model="m", data=DataOptions(data="d.jsonl", **data), run=RunOptions(out=str(out), resume=True))


def _record(out, cfg, drop=()):
    saved = json.loads(json.dumps(to_dict(cfg), default=str))
    for key in drop:
        section, name = key.split(".")
        del saved[section][name]
    (out / "run_config.json").write_text(json.dumps({"command": "sft", "config": saved}))


def test_a_setting_an_older_record_lacks_is_held_to_what_that_release_did(tmp_path):
    _record(tmp_path, _sft(tmp_path), drop=["data.turns"])  # (started before --turns existed: one example per conversation)
    assert check_resume(_sft(tmp_path), tmp_path, "sft") == []
    with pytest.raises(InputError, match=r"--turns 'last' -> 'all'"):
        check_resume(_sft(tmp_path, turns="all"), tmp_path, "sft")
    _record(tmp_path, _sft(tmp_path, turns="all"))  # (a record that has it: held to its own value)
    assert check_resume(_sft(tmp_path, turns="all"), tmp_path, "sft") == []
    with pytest.raises(InputError, match=r"--turns 'all' -> 'last'"):
        check_resume(_sft(tmp_path), tmp_path, "sft")
