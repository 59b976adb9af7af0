"""DPO alignment loop: feedback store, loss, gradient chunks, adapter publish (issue 5)."""
