"""Data: instruction sources and field layouts, prompt templates, splits, tokenisation and
collation, and the pre-training mixture (builder and memory-mapped reader)."""
