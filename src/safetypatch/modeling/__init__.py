"""Models: resolution and loading (hub id, local directory, .gguf, the embedded model), decoder-layer lookup,
fingerprints, generation (with the hand greedy decoder), the one base/patched switch, the SVD cache and version shims.

Import from here (`from ..modeling import load_model`), not from the modules, which may be split. Nothing heavy is
imported at module level: torch / transformers load inside the functions that need them. The generation backends
(`modeling.backends`) are imported from their module directly.
"""

from .compat import as_out_in, bf16_supported, cache_keyword, check_device, enable_checkpointing, params, unwrap_lm
from .generation import Chat, Generation, as_chat, generate
from .architecture import decoder_layers, layer_stack, num_layers
from .fingerprints import fingerprint, fingerprint_differences, fingerprint_id, fingerprint_like
from .loading import load_model, load_tokenizer, model_directory, resolve_model
from .roles import GROUPS, ROLES, Resolution, is_role, resolve_targets
from .scoring import token_kl
from .svd_cache import SVDCache
from .variants import FinetunedPair, variant

__all__ = ["Chat", "FinetunedPair", "GROUPS", "Generation", "ROLES", "Resolution", "SVDCache", "as_chat", "as_out_in",
           "bf16_supported", "cache_keyword", "check_device", "decoder_layers", "fingerprint",
           "fingerprint_differences", "fingerprint_id", "fingerprint_like", "generate", "is_role", "layer_stack",
           "load_model", "load_tokenizer", "model_directory", "num_layers", "params", "resolve_model",
           "resolve_targets", "token_kl", "unwrap_lm", "variant"]
