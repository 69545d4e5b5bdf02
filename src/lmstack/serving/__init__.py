"""Serving: persona cards (`cards`) and an OpenAI-compatible HTTP server (`app`) on the decoding
scheduler (`lmstack.generation.scheduler`)."""
