"""Deliver: send result objects to their destinations over C-STORE, with retries."""
