"""The one tokenizer home: `bpe` trains and loads the toolkit's byte-level BPE (HF `tokenizers`); `hf.HFTokenizer`
is a model directory's tokenizer with its special tokens and chat template (what the model opener returns).
Data preparation and the trainer's closing sample still use the plain `tokenizers.Tokenizer` that
`bpe.load_tokenizer` returns (`PreparedData.tokenizer()`)."""
