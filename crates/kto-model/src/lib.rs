//! Llama-family models with LoRA adapters on candle.
