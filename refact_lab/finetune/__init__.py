"""Fine-tuning: FIM formatting, packing, LoRA, the trainer and runs with their status on disk."""
