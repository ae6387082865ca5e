"""Training and evaluating the VQ image tokenizer (the model lives in ``pipeline.models.vq``)."""
