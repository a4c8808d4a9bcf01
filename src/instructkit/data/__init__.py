"""Instruction data: read rows, convert to conversations, render with one template, tokenize with masks."""
