"""Base models: the registry of known models (FIM format, context, LoRA targets) and how they are loaded."""
