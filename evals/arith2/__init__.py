"""The arith world, second generation (issue 14): R1-shaped reflective chains, a realistic BPE tokenizer, three sizes.

The problems, their hash split and their stable ids are the first generation's
(`evals.arith.problems`); what changes is how a solution is written
(`evals.arith2.chains`), how it is tokenized (`evals.arith2.tokenizer`) and which
models learn it (`evals.arith2.train`).
"""
