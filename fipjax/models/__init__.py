"""Models: a Flax NNX BERT and Hugging Face checkpoint loading."""

from fipjax.models.bert import BertClassifier, BertConfig, BertModel, make_apply, split_params
from fipjax.models.hub import CheckpointError, load_bert, load_tokenizer, packaged_minilm_dir, resolve_model_dir
