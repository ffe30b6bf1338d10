"""From DataOptions to the split a command needs (shared by sft, distill and evaluate)."""
from __future__ import annotations

from minillm_cli.data.examples import Example, load_examples
from minillm_cli.data.splits import split_examples


def load_splits(opts) -> dict[str, list[Example]]:
    """Read `opts.data` and split it deterministically (sizes and seed from `opts`). `--limit`
    applies to the data read, before splitting, so the split of a limited run is stable too."""
    examples = load_examples(opts.data, prompt_field=opts.prompt_field, response_field=opts.response_field,
                             input_field=opts.input_field, limit=opts.limit)
    return split_examples(examples, valid_size=opts.valid_size, test_size=opts.test_size, seed=opts.split_seed)
