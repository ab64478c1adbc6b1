"""The one model interface, on tiny randomly initialised open_clip and Hugging Face models (offline)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from xbt.errors import AssetMissingError, InputError, SpaceMismatchError
from xbt.models import EmbeddingSpace
from xbt.specs import load_model


def _check_interface(model, images, texts):
    img = model.encode_image(images)
    txt = model.encode_text(texts)
    assert img.shape == (len(images), model.embed_dim) and img.dtype == torch.float32
    assert txt.shape == (len(texts), model.embed_dim)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(len(images)), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(len(texts)), atol=1e-5, rtol=0)
    # Batching does not change results.
    torch.testing.assert_close(model.encode_image(images, batch_size=3), img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode_text(texts, batch_size=1), txt, atol=1e-5, rtol=1e-4)
    # Different inputs give different vectors (the model is not constant).
    assert (txt[0] - txt[1]).abs().max() > 1e-4
    assert model.space.dim == model.embed_dim


def test_openclip_tiny_model(tiny_openclip_names, image_files):
    model = load_model(f"openclip:{tiny_openclip_names[0]}")
    _check_interface(model, image_files[:5], ["a red apple", "a dog sleeps", "blue car", "tree", "cat"])


def test_openclip_tokenisation_is_real(tiny_openclip_names):
    model = load_model(f"openclip:{tiny_openclip_names[0]}")
    a, b = model.tokenize(["a red apple", "the dog sleeps"])
    assert not torch.equal(a, b)
    # Not every word is the same id: the BPE vocabulary is present.
    assert len(set(a[a > 0].tolist()) - set(b[b > 0].tolist())) >= 2


@pytest.mark.parametrize("fixture", ["tiny_hf_clip", "tiny_hf_siglip"])
def test_hf_tiny_models(fixture, request, image_files):
    folder = request.getfixturevalue(fixture)
    model = load_model(f"hf:{folder}")
    _check_interface(model, image_files[:4], ["a red apple", "a dog sleeps under wooden tables", "a blue car", "the green tree"])
    ids = model.tokenize(["a red apple", "the green tree"])["input_ids"]
    assert not torch.equal(ids[0], ids[1])


def test_hf_degenerate_tokenizer_is_refused(tiny_hf_clip, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_clip, broken)
    # A tokenizer whose vocabulary is only the unknown token: every word maps to it.
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]")),
                                  unk_token="[UNK]", pad_token="[PAD]")
    for f in broken.glob("tokenizer*"):
        f.unlink()
    tok.save_pretrained(broken)
    with pytest.raises(AssetMissingError, match="degenerate"):
        load_model(f"hf:{broken}")


def test_hf_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(AssetMissingError, match="local folder"):
        load_model(f"hf:{tmp_path / 'nothing-here'}")


def test_space_identity(tiny_openclip_names):
    a = load_model(f"openclip:{tiny_openclip_names[0]}")
    torch.manual_seed(1)
    a2 = load_model(f"openclip:{tiny_openclip_names[0]}")  # same architecture and dimension, other random weights
    assert a.space.dim == a2.space.dim
    assert a.space.fingerprint != a2.space.fingerprint
    with pytest.raises(SpaceMismatchError, match="same dimension"):
        a.space.check(a2.space)
    a.space.check(EmbeddingSpace.from_dict(a.space.to_dict()))


def test_bad_inputs(tiny_openclip_names, tmp_path):
    model = load_model(f"openclip:{tiny_openclip_names[0]}")
    with pytest.raises(InputError, match="empty"):
        model.encode_text(["a cat", "  "])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(InputError, match="corrupt.png"):
        model.encode_image([corrupt])
    with pytest.raises(InputError, match="not found"):
        model.encode_image([tmp_path / "missing.jpg"])
    with pytest.raises(InputError, match="N, C, H, W"):
        model.encode_image(torch.zeros(3, 32, 32))


def test_unknown_spec():
    with pytest.raises(InputError, match="backend"):
        load_model("ViT-B-32")
    with pytest.raises(InputError, match="unknown model backend"):
        load_model("tf:whatever")


def test_transparent_images_are_flattened_on_white():
    from xbt.data.images import load_image

    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)
