"""Jinja templates of the model cards hf_edit writes (``edit_adapter.md``, ``merged_model.md``)."""
