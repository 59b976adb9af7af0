"""The alignment loop: the feedback store, the DPO loss, fine-tune chunks on the worker
(``executor``), their planning on the event loop (``trainer``), the two LoRA adapters
(``adapters``) and their checkpoints."""
