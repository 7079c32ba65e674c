"""Jobs that turn raw text into tokenizers and token shards (see docs/data_prep.md)."""
