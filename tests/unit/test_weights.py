"""Rename tables read both ways: module names -> checkpoint names (rename_back) -> module names (load_weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rerankd.errors import ModelLoadError
from rerankd.models import jina_m0, xlm_roberta
from rerankd.models.decoder import TextConfig
from rerankd.models.qwen2_vl import VisionConfig
from rerankd.tiny import encoder_tiny_config, m0_tiny_config
from rerankd.weights import Part, load_weights, rename, rename_back

CPU = torch.device("cpu")


def cross_encoder(kind: str, family: str) -> xlm_roberta.CrossEncoder:
    return xlm_roberta.CrossEncoder(xlm_roberta.EncoderConfig.from_dict(encoder_tiny_config(kind, 50), family))


def m0() -> jina_m0.JinaM0:
    cfg = m0_tiny_config(vocab_size=128, first_special=100)
    return jina_m0.JinaM0(TextConfig.from_dict(cfg), VisionConfig.from_dict(cfg["vision_config"]))


# family -> its rename table and a function that builds the module it loads
FAMILIES = {
    "jina": (xlm_roberta.WEIGHT_RENAMES["jina"], lambda: cross_encoder("jina-reranker-v2", "xlm-roberta")),
    "xlm-roberta": (
        xlm_roberta.WEIGHT_RENAMES["xlm-roberta"], lambda: cross_encoder("jina-reranker-v2", "xlm-roberta")
    ),
    "bert": (xlm_roberta.WEIGHT_RENAMES["bert"], lambda: cross_encoder("bert-cross-encoder", "bert")),
    "m0": (jina_m0.WEIGHT_RENAMES, m0),
}


def random_state(family: str) -> dict[str, torch.Tensor]:
    """Random values for every tensor of the module (its own init may leave some uninitialized)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FAMILIES[family][1]().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def save(tensors: dict[str, torch.Tensor], directory) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))


def load(family: str, directory) -> dict[str, torch.Tensor]:
    """The module of `family` loaded (strictly) from `directory`, as the backends load it."""
    renames, make = FAMILIES[family]
    with torch.device("meta"):
        module = make()
    load_weights(module, directory, renames, CPU, torch.float32, show_progress=False)
    return module.state_dict()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip(family, tmp_path):
    """Every module tensor comes back under its own name, unchanged, Wqkv concatenated from its q, k, v."""
    state = random_state(family)
    save(rename_back(state, FAMILIES[family][0]), tmp_path)
    loaded = load(family, tmp_path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    "family, some_names",
    [
        ("jina", {"roberta.encoder.layers.0.mixer.Wqkv.weight", "roberta.emb_ln.bias", "classifier.out_proj.bias"}),
        ("xlm-roberta", {"roberta.encoder.layer.2.attention.self.value.bias", "roberta.embeddings.LayerNorm.weight",
                         "roberta.embeddings.word_embeddings.weight", "classifier.dense.weight"}),
        ("bert", {"bert.encoder.layer.0.output.LayerNorm.bias", "bert.pooler.dense.weight", "classifier.weight"}),
        ("m0", {"model.language_model.layers.0.self_attn.q_proj.bias", "model.visual.blocks.1.attn.qkv.weight",
                "model.language_model.embed_tokens.weight", "score.2.bias"}),
    ],
)  # fmt: skip
def test_checkpoint_names(family, some_names):
    """Backward writes each family's real names: one per module tensor, three (q, k, v) per fused Wqkv."""
    state = random_state(family)
    names = set(rename_back(state, FAMILIES[family][0]))
    assert some_names <= names, some_names - names
    fused = sum(".mixer.Wqkv." in k for k in state) if family in ("xlm-roberta", "bert") else 0
    assert len(names) == len(state) + 2 * fused


@pytest.mark.parametrize("family", ["xlm-roberta", "bert"])
def test_fused_qkv_is_split_into_query_key_value(family):
    state = random_state(family)
    checkpoint = rename_back(state, FAMILIES[family][0])
    prefix = "roberta." if family == "xlm-roberta" else "bert."
    assert not any("Wqkv" in k for k in checkpoint)
    for kind in ("weight", "bias"):
        fused = state[f"encoder.layers.1.mixer.Wqkv.{kind}"]  # [3 * hidden, ...]
        q, k, v = (checkpoint[f"{prefix}encoder.layer.1.attention.self.{p}.{kind}"] for p in ("query", "key", "value"))
        assert torch.equal(torch.cat([q, k, v]), fused)
        assert q.shape[0] == k.shape[0] == v.shape[0] == fused.shape[0] // 3


def test_forward_templates():
    renames = xlm_roberta.WEIGHT_RENAMES["bert"]
    key = rename("bert.encoder.layer.11.attention.self.key.bias", renames)
    assert key == Part("encoder.layers.11.mixer.Wqkv.bias", 1, 3)
    assert rename("bert.encoder.layer.3.output.dense.weight", renames) == "encoder.layers.3.mlp.fc2.weight"
    assert rename("bert.embeddings.position_ids", renames) is None  # dropped on purpose
    assert rename("bert.embeddings.position_ids_x", renames) == "embeddings.position_ids_x"  # a whole name only
    assert rename("classifier.weight", renames) == "classifier.out_proj.weight"
    assert rename("classifier.weight2", renames) == "classifier.weight2"  # unmapped: kept, then rejected on load
    assert rename("lm_head.weight", jina_m0.WEIGHT_RENAMES) is None


def test_forward_rejects_an_unmapped_tensor(tmp_path):
    checkpoint = rename_back(random_state("xlm-roberta"), FAMILIES["xlm-roberta"][0])
    save(checkpoint | {"roberta.encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)}, tmp_path)
    with pytest.raises(ModelLoadError, match=r"1 checkpoint tensors match no parameter.*self\.rotary\.weight"):
        load("xlm-roberta", tmp_path)


def test_forward_rejects_a_missing_part(tmp_path):
    checkpoint = rename_back(random_state("bert"), FAMILIES["bert"][0])
    del checkpoint["bert.encoder.layer.1.attention.self.key.weight"]
    save(checkpoint, tmp_path)
    missing = r"1 parameters missing from the checkpoint: \['encoder\.layers\.1\.mixer\.Wqkv\.weight'\]"
    with pytest.raises(ModelLoadError, match=missing):
        load("bert", tmp_path)


def test_dropped_tensors_load_and_are_never_written(tmp_path):
    checkpoint = rename_back(random_state("m0"), FAMILIES["m0"][0])
    assert not any(k.startswith("lm_head.") for k in checkpoint)
    embed = checkpoint["model.language_model.embed_tokens.weight"]
    save(checkpoint | {"lm_head.weight": torch.zeros_like(embed)}, tmp_path)
    load("m0", tmp_path)  # lm_head is dropped on purpose


def test_backward_refuses_a_table_it_cannot_invert():
    with pytest.raises(ValueError, match="not invertible at visual.w"):  # kept by backward, dropped by forward
        rename_back({"visual.w": torch.zeros(1)}, [("visual.", None)])
    with pytest.raises(ValueError, match="cannot split"):  # parts 0 and 2 of 3 declared, not 1
        rename_back({"f.w": torch.zeros(3)}, [("q.", Part("f.", 0, 3)), ("v.", Part("f.", 2, 3))])
    with pytest.raises(ValueError, match="same"):  # {n} on one side only
        rename_back({"f.1.w": torch.zeros(3)}, [("g.", "f.{n}.")])
