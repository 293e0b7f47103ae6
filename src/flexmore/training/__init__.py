"""Training: the embedded corpus, a locally trained tokenizer, data loading and packing.

Import the submodules (`flexmore.training.corpus`, `.tokenizer`, `.data`): this package imports nothing
at load time, so `import flexmore.training.corpus` does not pull in transformers.
"""
