"""Jobs that turn raw text into tokenizers and token shards (see the README, "Data prep")."""
