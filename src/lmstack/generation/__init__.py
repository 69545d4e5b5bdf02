"""Decoding, written once against the model contract: sampling with composable transforms,
greedy, beam search, batched and streaming generation."""

from lmstack.generation.beam import Beam, beam_search
from lmstack.generation.config import GenerationConfig
from lmstack.generation.engine import Generation, generate, generate_groups, generate_tokens, stream

__all__ = ["Beam", "GenerationConfig", "Generation", "beam_search", "generate", "generate_groups", "generate_tokens", "stream"]
