"""Offline tiny Qwen2-Audio tokenizer, processor and model (caad.tiny_models)."""

import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from caad.tiny_models import (  # noqa: E402
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_TOKEN,
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_processor,
    build_tokenizer,
    tiny_qwen2_audio,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def proc(tok):
    return build_processor(tok)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_qwen2_audio(tok)


def _chat(proc, question="How many beeps are there?"):
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _batch(proc, seconds=(0.3, 0.8, 1.2, 1.9), seed=0):
    rng = np.random.default_rng(seed)
    audios = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    return proc(text=[_chat(proc)] * len(audios), audio=audios, sampling_rate=16000, return_tensors="pt", padding=True)


def test_import_caad_does_not_import_transformers():
    code = "import sys, caad; assert 'transformers' not in sys.modules and 'torch' not in sys.modules; caad.synthetic"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_special_tokens(tok):
    for t in (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS, IM_START, IM_END, PAD_TOKEN):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == IM_END
    assert tok.pad_token_id != tok.eos_token_id


def test_tokenizer_words_are_single_tokens_and_extra_words(tok):
    for w in ("three", " three", "beeps", " loud", " quiet", "high"):
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    assert len(tok(" xylophone", add_special_tokens=False)["input_ids"]) > 1
    tok2 = build_tokenizer(extra_words=["xylophone"])
    assert len(tok2(" xylophone", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok2) > len(tok)


def test_tokenizer_lossless_and_deterministic(tok):
    text = "Ünïcode ✓ 42 beeps,\n\ttabs — and <|AUDIO|> stay"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert build_tokenizer().get_vocab() == tok.get_vocab()


def test_chat_template_places_audio_placeholder(tok, proc):
    text = _chat(proc)
    assert f"Audio 1: {AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}\n" in text
    assert text.startswith(f"{IM_START}system\n") and text.endswith(f"{IM_START}assistant\n")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith("assistant\n")


def test_processor_features_and_audio_token_expansion(tok, proc):
    seconds = (0.3, 0.8, 1.2, 1.9)
    inp = _batch(proc, seconds)
    assert inp["input_features"].shape == (4, 80, 200) and inp["input_features"].dtype == torch.float32
    frames = inp["feature_attention_mask"].sum(-1)
    assert frames.tolist() == [int(s * 100) for s in seconds]
    n_audio = (inp["input_ids"] == tok.convert_tokens_to_ids(AUDIO_TOKEN)).sum(-1)
    expected = (((frames - 1) // 2 + 1) - 2) // 2 + 1
    assert n_audio.tolist() == expected.tolist()
    assert (
        build_processor(tok, chunk_length=3)(
            text=[_chat(proc)], audio=[np.zeros(800, np.float32)], sampling_rate=16000, return_tensors="pt"
        )["input_features"].shape[-1]
        == 300
    )


def test_model_matches_tokenizer(tok, model):
    assert model.config.audio_token_index == tok.convert_tokens_to_ids(AUDIO_TOKEN)
    assert model.config.text_config.vocab_size == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert not model.training
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_forward_with_audio_is_fast_and_uses_audio(tok, proc, model):
    inp = _batch(proc)
    with torch.no_grad():
        model(**inp)  # warm-up
        t0 = time.perf_counter()
        out = model(**inp)
        elapsed = time.perf_counter() - t0
        other = model(**{**inp, "input_features": _batch(proc, seed=1)["input_features"]})
    assert out.logits.shape == (*inp["input_ids"].shape, len(tok))
    assert torch.isfinite(out.logits).all()
    assert elapsed < 1.0, f"batch-4 forward took {elapsed:.2f} s"
    # different audio changes the logits after the audio span, not the system prompt before it
    assert not torch.allclose(out.logits[:, -1], other.logits[:, -1])
    assert torch.equal(out.logits[:, :5], other.logits[:, :5])


def test_text_only_forward(tok, model):
    ids = tok(["Is it loud or quiet?"], return_tensors="pt")
    with torch.no_grad():
        out = model(**ids)
    assert out.logits.shape == (1, ids["input_ids"].shape[1], len(tok))


def test_seeded_weights_and_global_rng_untouched(tok, model):
    state = torch.random.get_rng_state()
    same = tiny_qwen2_audio(tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    other = tiny_qwen2_audio(tok, seed=1)
    w = model.lm_head.weight
    assert torch.equal(same.lm_head.weight, w)
    assert not torch.equal(other.lm_head.weight, w)


def test_model_size_options_and_errors(tok, proc):
    small = tiny_qwen2_audio(tok, hidden=32, layers=1)
    assert small.config.text_config.hidden_size == 32 and small.config.text_config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="hidden"):
        tiny_qwen2_audio(tok, hidden=30)
    with pytest.raises(ValueError, match="layers"):
        tiny_qwen2_audio(tok, layers=0)
    # the model and the processor must agree on the feature window
    mismatched = tiny_qwen2_audio(tok, chunk_length=3)
    with torch.no_grad(), pytest.raises(ValueError, match="length 300"):
        mismatched(**_batch(proc, (0.5,)))
