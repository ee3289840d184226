"""Export: a checkpoint as a Hugging Face model folder and back (:mod:`.hf`; docs/export.md)."""
