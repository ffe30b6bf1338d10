"""Evaluation: generation metrics, evaluate result files, compare tables and plots, the LLM judge.

Modules import only the standard library at top level (matplotlib, rouge_score and rich load
inside the functions that need them), so importing `minillm_cli.eval` stays cheap."""
