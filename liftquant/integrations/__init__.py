"""Optional integrations with other libraries (transformers ``from_pretrained``)."""
