"""From DataOptions to the split a command needs (shared by sft, distill and evaluate)."""
from __future__ import annotations

from typing import Callable

from minillm_cli.data.examples import Example, load_examples
from minillm_cli.data.splits import split_examples
from minillm_cli.data.template import check_template_fits
from minillm_cli.progress import Progress


def load_splits(opts, *, note: Callable[[str], None] | None = None,
                warn: Callable[[str], None] | None = None) -> dict[str, list[Example]]:
    """Read `opts.data` and split it deterministically (sizes and seed from `opts`). `--limit`
    applies to the data read, before splitting, so the split of a limited run is stable too.
    `note`: the progress log (what the data layer read and dropped); `warn`: a warning line that
    --quiet does not hide (default: stderr) -- validation data that is also training data."""
    fields = dict(prompt_field=opts.prompt_field, response_field=opts.response_field, input_field=opts.input_field,
                  turns=getattr(opts, "turns", "last"))
    examples = load_examples(opts.data, limit=opts.limit, note=note, **fields)
    check_template_fits(examples, opts.template)
    valid_data = getattr(opts, "valid_data", None)
    splits = split_examples(examples, valid_size=0 if valid_data else opts.valid_size, test_size=opts.test_size,
                            seed=opts.split_seed)
    if valid_data:
        splits["valid"] = load_examples(valid_data, note=note, **fields)
        check_template_fits(splits["valid"], opts.template)
        # A validation example the model also trains on measures memorisation, not generalisation
        # (and sft keeps the checkpoint it ranks best): said, as it is easy to do by accident
        # (--valid-data naming DATA itself, or a held-out file that shares examples with it).
        both = overlap(splits["train"], splits["valid"]) if getattr(opts, "warn_overlap", True) else 0
        if both:
            (warn or Progress("data").warn)(
                f"{both} of {len(splits['valid'])} validation examples (--valid-data {valid_data}) are also "
                f"training examples (same prompt and response as one of --data {opts.data}): validation is not "
                f"on held-out data")
    return splits


def overlap(train: list[Example], valid: list[Example]) -> int:
    """How many of `valid` are also in `train`: the same prompt (instruction and input) and the
    same response (the training target)."""
    seen = {_key(e) for e in train}
    return sum(_key(e) in seen for e in valid)


def _key(e: Example) -> tuple:
    return e.instruction, e.input, e.response, tuple((m["role"], m["content"]) for m in e.history)
