"""Training engines (sft, distill and baselines) and the pieces they share."""
