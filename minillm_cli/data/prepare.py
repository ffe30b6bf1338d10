"""From DataOptions to the split a command needs (shared by sft, distill and evaluate)."""
from __future__ import annotations

from minillm_cli.data.examples import Example, load_examples
from minillm_cli.data.splits import split_examples


def load_splits(opts) -> dict[str, list[Example]]:
    """Read `opts.data` and split it deterministically (sizes and seed from `opts`). `--limit`
    applies to the data read, before splitting, so the split of a limited run is stable too."""
    fields = dict(prompt_field=opts.prompt_field, response_field=opts.response_field, input_field=opts.input_field)
    examples = load_examples(opts.data, limit=opts.limit, **fields)
    valid_data = getattr(opts, "valid_data", None)
    splits = split_examples(examples, valid_size=0 if valid_data else opts.valid_size, test_size=opts.test_size,
                            seed=opts.split_seed)
    if valid_data:
        splits["valid"] = load_examples(valid_data, **fields)
    return splits
