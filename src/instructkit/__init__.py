"""instructkit: instruction tuning with one template from data to inference.

The Python API is `instructkit.api` (load_config, train, load_for_inference, generate, evaluate,
build_report); the command line is `instructkit` / `python -m instructkit`.
"""

__version__ = "0.1.0"
