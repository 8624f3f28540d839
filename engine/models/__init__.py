"""Model specs as data: real shapes from public configs, plus tiny test models.

``load_spec("llama-3.1-8b")`` loads a preset; ``load_spec("my-model.toml")`` loads a
user's file in the same schema (see :class:`ModelSpec` for the fields).
"""

from engine.models.spec import ModelSpec, SpecError, list_models, load_spec, spec_from_dict

__all__ = ["ModelSpec", "SpecError", "list_models", "load_spec", "spec_from_dict"]
