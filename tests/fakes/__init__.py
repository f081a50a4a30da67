"""Stand-ins for services and models: fake HTTP servers speaking the real wire protocols, scripted LLMs and
embedders built by `LLMSpec(backend="custom")`, and an in-memory Beam filesystem."""
