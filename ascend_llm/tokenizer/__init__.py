"""The one tokenizer home: `bpe` trains and loads the toolkit's byte-level BPE (HF `tokenizers`), `hf.HFTokenizer`
is the one tokenizer type in circulation (a model directory's tokenizer, special tokens and chat template)."""
