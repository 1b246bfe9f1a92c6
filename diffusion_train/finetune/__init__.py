"""Fine-tuning methods and tasks: LoRA adapters (``lora``), inpainting (``inpainting``, with ``masks``)."""
