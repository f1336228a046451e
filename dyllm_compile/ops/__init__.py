"""torch.library custom ops of dyllm-compile, each with its fake impl and plain-torch reference."""

from .attention_sinks import sdpa_with_sinks, sdpa_with_sinks_reference
from .cached_attention import MODES, cached_attention, cached_attention_reference, repeat_kv_heads
from .soft_capping import sdpa_softcap, sdpa_softcap_reference

__all__ = ["MODES", "cached_attention", "cached_attention_reference", "repeat_kv_heads", "sdpa_softcap",
           "sdpa_softcap_reference", "sdpa_with_sinks", "sdpa_with_sinks_reference"]
