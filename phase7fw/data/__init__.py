"""Data: the mixture sampler and its train/validation split (:mod:`.mixture`) and the
tokenized cache (:mod:`.cache`). Sources and tokenizers are components (kinds
``data_source`` and ``tokenizer``); see docs/data.md.
"""
