"""SFT: the tokenizer, chat-template rendering with assistant-only loss masks, their proof, and token counts."""
