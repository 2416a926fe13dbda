"""The parts of `python -m trainer.serve` (trainer/serve.py): the micro-batcher, reading and checking
request bodies, and guarding connections. None of them imports the training loop or the datasets."""
