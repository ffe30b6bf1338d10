"""The pre-training mixture behind MiniLLM's PT loss, in one import: the builder
(`pretrain_build`, with its sources in `pretrain_sources` and workers in `pretrain_work`) and the
memory-mapped reader (`pretrain_read`) that `distill --pt-data` uses."""
from minillm_cli.data.pretrain_build import PretrainMixConfig, build_mixture  # noqa: F401
from minillm_cli.data.pretrain_read import (  # noqa: F401
    PretrainData,
    fingerprint,
    indices_for_step,
)
from minillm_cli.data.pretrain_sources import SourceSpec, parse_source  # noqa: F401

__all__ = ["PretrainMixConfig", "build_mixture", "PretrainData", "fingerprint", "indices_for_step",
           "SourceSpec", "parse_source"]
