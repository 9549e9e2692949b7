"""Voxtral's stand-in processor (caad/models/voxtral.py) against what the real pipeline does: the features equal
transformers' ``VoxtralProcessor._retrieve_input_features`` (called with the stand-in's feature extractor, since the
real processor needs mistral_common), a clip longer than a window takes several feature rows, the audio-token
count is the model's audio-embedding count, and prompts follow Mistral's instruct layout."""

import types

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from caad.models import families  # noqa: E402
from caad.teacher import DualViewCollator, teacher_forward_both_views  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return families()["Voxtral"].build_tiny(hidden=16, layers=1, seed=0)


def _clips():
    rng = np.random.default_rng(0)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (11_000, 80_000, 64_000)]  # 0.7 s, 5 s, 4 s


def test_features_equal_the_real_processors_windows(tiny):
    from transformers.models.voxtral.processing_voxtral import VoxtralProcessor

    if not hasattr(VoxtralProcessor, "_retrieve_input_features"):
        pytest.skip("this transformers' VoxtralProcessor has no _retrieve_input_features")
    _, processor = tiny
    fe = processor.feature_extractor
    stub = types.SimpleNamespace(feature_extractor=fe)
    clips = _clips()
    # The real processor's audio_kwargs, with the tiny window in place of 30 s / 3000 frames.
    real = VoxtralProcessor._retrieve_input_features(
        stub, clips, processor.window_frames, sampling_rate=fe.sampling_rate, padding=True, truncation=False,
        pad_to_multiple_of=fe.n_samples, return_tensors="pt")
    ours, windows = processor.features(clips)
    assert windows == [1, 3, 2]  # 4 s is exactly two 2 s windows
    assert ours.shape == tuple(real.shape) == (6, 128, 200)
    np.testing.assert_allclose(ours, real.numpy(), rtol=0, atol=1e-6)


def test_audio_tokens_match_the_models_audio_embeddings(tiny):
    model, processor = tiny
    clips = _clips()
    enc = processor(text=["[BEGIN_AUDIO][AUDIO]a", "[BEGIN_AUDIO][AUDIO][BEGIN_AUDIO][AUDIO]b"], audio=clips,
                    sampling_rate=16000)
    counts = [row.count(processor.audio_token_id) for row in enc["input_ids"]]
    # mistral_common: ceil(padded frames / 8) tokens per clip, i.e. 25 per 2 s window here (375 per 30 s).
    assert counts == [25, 75 + 50]
    with torch.no_grad():
        embeds = model.get_audio_features(torch.as_tensor(enc["input_features"])).pooler_output
    assert embeds.shape[0] == sum(counts)
    with pytest.raises(ValueError, match="2 audio clips for 3"):
        processor(text=["[BEGIN_AUDIO][AUDIO]a", "[BEGIN_AUDIO][AUDIO][BEGIN_AUDIO][AUDIO]b"], audio=clips[:2])


def test_prompts_follow_mistrals_instruct_layout_and_long_clips_batch(tiny):
    model, processor = tiny
    clips = _clips()
    examples = [{"audio": a, "instruction": "How many beeps ?", "pseudo_gt": "three"} for a in clips]
    batch = DualViewCollator(processor, text_only_view="silence")(examples)
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["audio_view"]["input_ids"][0])
    assert tokens[:4] == ["<s>", "[INST]", "[BEGIN_AUDIO]", "[AUDIO]"]
    end = tokens.index("[/INST]")
    assert tokens[end - 1] != "[AUDIO]" and tokens[end + 1 :].index("</s>") >= 1
    assert batch["audio_view"]["input_features"].shape[0] == 6  # one row per window, not per example
    a, t, ids = teacher_forward_both_views(model, batch)
    assert a.shape == t.shape and torch.equal(ids, batch["target_ids"])
