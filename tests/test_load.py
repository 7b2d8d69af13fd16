"""A model folder's config is parsed once per process (gkd.models.load.read_config) and read anew once the folder
is written again."""

import pytest
import torch

from gkd.models import load_model
from gkd.models.load import read_config
from tiny import write_model


def test_a_folder_written_again_in_place_loads_as_the_new_model(tmp_path):
    folder = tmp_path / "m"
    write_model(folder, layers=2, seed=2)
    first = load_model(str(folder))
    mine = read_config(folder)
    mine.num_hidden_layers = 7  # a caller's copy: the next read does not see it
    assert read_config(folder).num_hidden_layers == 2
    # the same folder, another model, written at once: config.json of the same size (2 -> 3 layers), likely within
    # the file clock's tick, so only its bytes tell
    write_model(folder, layers=3, seed=1)
    second = load_model(str(folder))
    assert second.config.num_hidden_layers == len(second.model.layers) == 3
    assert not torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)


def test_a_tokenizer_loads_beside_a_config_transformers_cannot_read(tmp_path):
    """A teacher served elsewhere may be of an architecture this transformers does not know: only its tokenizer is
    loaded here, and it loads (the config is left to AutoTokenizer's own fallback); the tokenizer of a readable
    folder is that folder's."""
    import json

    from gkd.models import load_tokenizer

    folder = write_model(tmp_path / "m")
    known = load_tokenizer(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "an_architecture_from_the_future"}))
    with pytest.raises(ValueError):
        read_config(folder)
    tok = load_tokenizer(str(folder))
    assert tok("w1 w2")["input_ids"] == known("w1 w2")["input_ids"] and tok.pad_token_id is not None
