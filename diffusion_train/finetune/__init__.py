"""Fine-tuning methods: LoRA adapters (``lora``)."""
