"""Granite-Speech's stand-in processor (caad/models/granite_speech.py): its features against an independent numpy
STFT (and against the real torchaudio-based extractor where torchaudio is installed), its audio-token counts
against the model's projector, silence, the saved folder, and the head-on-targets claim."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from caad.models import family_of, load_processor  # noqa: E402
from caad.models.granite_speech import (  # noqa: E402
    AUDIO,
    GraniteAudioProcessor,
    GraniteLogMel,
    audio_token_counts,
    build_tiny,
)
from caad.teacher import feature_tensor  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(hidden=16, layers=1, seed=3)


def _clips():
    rng = np.random.default_rng(0)
    t = np.arange(16001) / 16000  # 16001 samples: 101 mel frames, an odd count, so the last one is dropped
    return [(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
            (0.05 * rng.standard_normal(7000)).astype(np.float32)]


def _numpy_reference(clips, extractor):
    from transformers.audio_utils import spectrogram, window_function

    longest = max(len(c) for c in clips)
    out = []
    for clip in clips:
        padded = np.pad(clip.astype(np.float64), (0, longest - len(clip)))
        mel = spectrogram(padded, window_function(400, "hann", frame_length=512), frame_length=512, hop_length=160,
                          fft_length=512, power=2.0, center=True, pad_mode="reflect",
                          mel_filters=extractor.mel_filters().numpy().astype(np.float64), mel_floor=1e-10,
                          log_mel="log10").T  # [T, 80]
        mel = np.maximum(mel, mel.max() - 8.0) / 4 + 1
        out.append(mel[: len(mel) // 2 * 2].reshape(-1, 160))
    return np.stack(out)


def test_features_match_an_independent_numpy_log_mel():
    extractor = GraniteLogMel()
    clips = _clips()
    features = extractor(clips)
    assert features["input_features"].shape == (2, 50, 160) and features["input_features"].dtype == torch.float32
    # float32 STFT (as torchaudio's) against float64 numpy: the weakest bins of a pure tone differ in the 5th digit
    np.testing.assert_allclose(features["input_features"].numpy(), _numpy_reference(clips, extractor), atol=1e-4)


def test_features_match_the_real_extractor_where_torchaudio_is_installed():
    pytest.importorskip("torchaudio")
    from transformers import GraniteSpeechFeatureExtractor

    clips = _clips()
    real = GraniteSpeechFeatureExtractor()([torch.from_numpy(c) for c in clips])
    ours = GraniteLogMel()(clips)
    torch.testing.assert_close(ours["input_features"], real["input_features"].float(), atol=1e-4, rtol=1e-4)
    assert ours["audio_embed_sizes"] == list(real["audio_embed_sizes"])
    assert torch.equal(ours["input_features_mask"], real["input_features_mask"])


def test_audio_tokens_fill_the_projector_output_exactly(tiny):
    model, processor = tiny
    clips = _clips()
    # 50 and 22 encoder frames: 4 and 2 windows of 15, 3 tokens each
    assert audio_token_counts([len(c) for c in clips]) == [12, 6]
    enc = processor(text=[f"{AUDIO}hi", f"a {AUDIO} b"], audio=clips, sampling_rate=16000, add_special_tokens=False)
    audio_id = processor.tokenizer.convert_tokens_to_ids(AUDIO)
    assert [ids.count(audio_id) for ids in enc["input_ids"]] == [12, 6]
    mask = feature_tensor(enc["input_features_mask"])
    assert mask.dtype == torch.bool and mask.sum(-1).tolist() == [12, 6]
    with torch.no_grad():
        projected = model.get_audio_features(feature_tensor(enc["input_features"])).pooler_output
    assert projected.shape[:2] == (2, 12)
    length = max(len(ids) for ids in enc["input_ids"])
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids in enc["input_ids"]])
    with torch.no_grad():  # the model's merge checks that tokens and selected projector rows agree
        logits = model(input_ids=input_ids, input_features=feature_tensor(enc["input_features"]),
                       input_features_mask=mask).logits
    assert logits.shape == (2, length, len(processor.tokenizer))


def test_silence_gives_constant_features_and_placeholders_must_match_clips(tiny):
    _, processor = tiny
    enc = processor(text=[AUDIO], audio=[np.zeros(9000, np.float32)], sampling_rate=16000)
    assert torch.all(enc["input_features"] == -1.5)  # log10(1e-10) = -10, floored at itself, / 4 + 1
    with pytest.raises(ValueError, match="2 audio clips for 1"):
        processor(text=[AUDIO], audio=_clips(), sampling_rate=16000)
    with pytest.raises(ValueError, match="resample"):
        processor(text=[AUDIO], audio=_clips()[:1], sampling_rate=8000)


def test_the_head_on_target_rows_is_exact_despite_logits_scaling(tiny):
    model, processor = tiny
    assert model.config.text_config.logits_scaling != 1.0 and family_of(model).head_on_targets
    enc = processor(text=[f"{AUDIO}hi"], audio=_clips()[:1], sampling_rate=16000, add_special_tokens=False)
    inputs = {"input_ids": torch.tensor(enc["input_ids"]), "input_features": enc["input_features"],
              "input_features_mask": enc["input_features_mask"]}
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state
        assert torch.equal(model.get_output_embeddings()(hidden), model(**inputs).logits)


def test_the_saved_folder_loads_back_as_the_stand_in(tiny, tmp_path):
    _, processor = tiny
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["feature_extractor_type"] == "GraniteSpeechFeatureExtractor" and config["n_mels"] == 80
    loaded = load_processor(tmp_path)
    assert isinstance(loaded, GraniteAudioProcessor)
    assert loaded.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.tokenizer.eos_token == "<|end_of_text|>"
    assert loaded.tokenizer.chat_template == processor.tokenizer.chat_template
