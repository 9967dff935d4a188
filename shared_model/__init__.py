"""What the server and every silo must agree on: data schema, text serialisation,
tokenizer, encoder, LoRA config, heads, and adapter (de)serialisation."""
