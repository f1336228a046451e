"""Hugging Face remote-code wrapping of the reference model, and loading of local checkpoints.

:func:`save_pretrained` writes a checkpoint directory of the kind LLaDA and Dream ship: ``config.json`` with an
``auto_map``, the modeling source files and ``model.safetensors``. :func:`load_pretrained` loads any such
directory (ours, LLaDA-8B, Dream-7B) with ``trust_remote_code`` and never touches a hub.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import transformers
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

# transformers 4 copies into a remote-code checkpoint's module cache only the files this one imports, not what they
# import in turn: transformer.py's grouped product op is imported here so that a loaded checkpoint finds it.
from .grouped_mm import grouped_mm  # noqa: F401
from .transformer import DiffusionTransformer, Rotary, TransformerConfig

_TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])


class DyllmLMConfig(PretrainedConfig):
    model_type = "dyllm_lm"

    def __init__(self, transformer: Optional[dict] = None, **kwargs) -> None:
        self.transformer = dict(transformer or {})
        super().__init__(**kwargs)


class DyllmLMModel(PreTrainedModel):
    config_class = DyllmLMConfig
    base_model_prefix = "model"

    def __init__(self, config: DyllmLMConfig) -> None:
        super().__init__(config)
        self.model = DiffusionTransformer(TransformerConfig(**config.transformer))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # DiffusionTransformer seeds its own init and loading overwrites the weights; the RoPE tables are no
        # checkpoint's, and transformers 5 leaves them unset after building the model on the meta device.
        if isinstance(module, Rotary):
            module.reset_tables()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_) -> MaskedLMOutput:
        return MaskedLMOutput(logits=self.model(input_ids, attention_mask))


def save_pretrained(model: DiffusionTransformer, path: Union[str, os.PathLike]) -> None:
    """Saves ``model`` as a remote-code checkpoint directory (auto_map + modeling files + safetensors)."""
    DyllmLMConfig.register_for_auto_class()
    DyllmLMModel.register_for_auto_class("AutoModel")
    wrapped = DyllmLMModel(DyllmLMConfig(transformer=model.cfg.to_dict(), architectures=["DyllmLMModel"]))
    wrapped.model.load_state_dict(model.state_dict())
    wrapped.save_pretrained(path)


def load_pretrained(
    path: Union[str, os.PathLike],
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.nn.Module:
    """Loads a local Hugging Face checkpoint directory (e.g. LLaDA-8B-Instruct, Dream-v0-Instruct-7B)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path!r} is not a local checkpoint directory (no config.json); dyllm-compile never downloads "
            "from a hub: download the checkpoint first and pass its directory"
        )
    # transformers renamed torch_dtype to dtype in 4.56 and warns on the old name.
    dtype_kw = "dtype" if _TRANSFORMERS_VERSION >= (4, 56) else "torch_dtype"
    model = AutoModel.from_pretrained(
        path, trust_remote_code=True, local_files_only=True, **{dtype_kw: dtype or "auto"}
    )
    if device is not None:
        model = model.to(device)
    return model.eval()
