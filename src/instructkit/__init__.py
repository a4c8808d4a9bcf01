"""instructkit: instruction tuning with one template from data to inference.

The Python API the CLI wraps (imported lazily, so `import instructkit` is instant):

    from instructkit import load_config, train, load_for_inference, generate
    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=10"])
    run_dir = train(cfg)
    model = load_for_inference(str(run_dir))
    print(generate(model, [messages_from_cli("Say hi", None, None)])[0])
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "load_config": "instructkit.config",
    "RunConfig": "instructkit.config",
    "train": "instructkit.train",
    "load_for_inference": "instructkit.generate",
    "generate": "instructkit.generate",
    "messages_from_cli": "instructkit.generate",
    "evaluate": "instructkit.evaluate",
    "Message": "instructkit.data.formats",
    "UserError": "instructkit.errors",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'instructkit' has no attribute {name!r}")
    # Import every API module first, then bind: importing the submodule `instructkit.train` sets the
    # package attribute `train` to the module, which must not shadow the function of the same name.
    modules = {path: import_module(path) for path in set(_API.values())}
    for api_name, path in _API.items():
        globals()[api_name] = getattr(modules[path], api_name)
    return globals()[name]
