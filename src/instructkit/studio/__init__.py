"""`instructkit studio`: a local web app over run directories.

It sits just below the CLI in the layers: it reads run directories (manifest.json, metrics.jsonl,
config.yaml, the logs) and calls library functions for what it shows, and it trains, evaluates and
exports only by spawning the normal CLI (`python -m instructkit train|eval|report|merge|export-gguf`) as
child processes in their own sessions, so the studio can stop or restart while runs go on. Nothing below
it imports it. Importing this package is free of side effects and heavy imports.
"""
