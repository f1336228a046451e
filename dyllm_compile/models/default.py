"""The embedded default model: the LLaDA-like reference transformer trained in-repo on the generated tasks.

Trained by :mod:`dyllm_compile.train` (its ``loss.png`` and ``loss.csv`` ship beside the weights); the tokenizer
and the task formats are in :mod:`dyllm_compile.tasks`.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from .transformer import DiffusionTransformer, TransformerConfig

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default")


def load_checkpoint(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> DiffusionTransformer:
    """Loads a ``config.json`` + ``model.safetensors`` directory written by :func:`dyllm_compile.train.train`."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise FileNotFoundError(f"{path!r} holds no config.json + model.safetensors checkpoint")
    with open(config_path) as f:
        model = DiffusionTransformer(TransformerConfig(**json.load(f)))
    model.load_state_dict(load_file(weights_path))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_default_model(dtype: Optional[torch.dtype] = None) -> DiffusionTransformer:
    """The shipped trained model, in eval mode (fp32 unless ``dtype`` is given)."""
    return load_checkpoint(DEFAULT_MODEL_DIR, dtype)
