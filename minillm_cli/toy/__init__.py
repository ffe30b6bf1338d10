"""The embedded synthetic world behind `minillm quickstart`: a tokenizer, tiny models and a task
whose right answers are known exactly. Generated locally; nothing is downloaded."""
