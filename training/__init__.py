"""Training our own checkpoints: the corpus, reversible backprop, the training loop and the evaluation.

Beside the inference core (`model/`), which it imports and which never imports it: the server's image
ships without this package and its extra (`pip install -e '.[train]'`).
"""
