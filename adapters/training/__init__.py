"""Training LoRA adapters with PEFT: from chat examples in the OpenAI fine-tuning format to an adapter folder
that Banyan's upload accepts."""
