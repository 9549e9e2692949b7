"""Gemma-3n specifics (caad/models/gemma3n.py) beyond the family-wide tests of test_caad_models.py: the soft-token
count per clip, the token layout its embedders need, the stand-in vision tower (and that a saved tiny checkpoint
loads without timm in a fresh process), boolean feature masks, and layer selection through the per-layer
embeddings and the KV-sharing tail."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from caad.make_student import select_layers  # noqa: E402
from caad.models import families  # noqa: E402
from caad.models.gemma3n import EOA, EOI, VisionTowerStandIn, audio_soft_tokens  # noqa: E402
from caad.synthetic import beep_records  # noqa: E402
from caad.teacher import DualViewCollator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILY = families()["Gemma-3n"]


@pytest.fixture(scope="module")
def tiny():
    return FAMILY.build_tiny(hidden=16, layers=1, seed=3)


def test_the_released_config_gives_188_soft_tokens_per_30_second_clip():
    from transformers import Gemma3nAudioConfig, Gemma3nConfig

    assert audio_soft_tokens(Gemma3nAudioConfig()) == 188 == Gemma3nConfig().audio_soft_tokens_per_image


def test_the_tiny_window_fills_exactly_the_soft_tokens_and_the_vocabulary_ends_with_the_audio_range(tiny):
    model, processor = tiny
    config, tokenizer = model.config, processor.tokenizer
    assert processor.audio_seq_length == config.audio_soft_tokens_per_image
    clip = torch.randn(30 * 16000, generator=torch.Generator().manual_seed(0)).numpy() * 0.1
    features = processor.feature_extractor([clip], return_tensors="pt")
    with torch.no_grad():
        encoded = model.model.get_audio_features(features["input_features"], ~features["input_features_mask"])
    assert encoded.pooler_output.shape[1] == config.audio_soft_tokens_per_image
    # ids >= the vision offset are embedded by the vision embedder, >= the audio offset by the audio embedder
    assert config.vision_config.vocab_offset == tokenizer.convert_tokens_to_ids(EOI)
    assert config.audio_config.vocab_offset == tokenizer.convert_tokens_to_ids(EOA)
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.audio_config.vocab_offset + config.audio_config.vocab_size == len(tokenizer)
    assert config.audio_token_id == tokenizer.convert_tokens_to_ids(FAMILY.audio_token)


def test_the_feature_mask_stays_boolean(tiny):
    _, processor = tiny
    records = beep_records(2, seed=1)
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": r["label"]}
                for r in records]
    batch = DualViewCollator(processor, text_only_view="silence")(examples)
    for view in ("audio_view", "text_view"):
        assert batch[view]["input_features_mask"].dtype == torch.bool  # the model inverts it with ~
        assert batch[view]["input_features"].dtype == torch.float32


def test_the_stand_in_vision_tower_cannot_see_and_real_vision_configs_still_need_timm(tiny):
    from transformers import Gemma3nVisionConfig
    from transformers.models.gemma3n import modeling_gemma3n

    model, _ = tiny
    assert isinstance(model.model.vision_tower, VisionTowerStandIn)
    assert not list(model.model.vision_tower.parameters())
    with pytest.raises(NotImplementedError, match="stand-in vision tower"):
        model.model.vision_tower(pixel_values=torch.zeros(1, 3, 32, 32))
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="timm"):  # a released config is not given the stand-in
            modeling_gemma3n.AutoModel.from_config(Gemma3nVisionConfig())


def test_a_saved_tiny_checkpoint_loads_through_caad_in_a_fresh_process(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    code = ("import sys; from caad.cli import _load_model; from caad.models import family_of, load_processor; "
            "m = _load_model(sys.argv[1]); p = load_processor(sys.argv[1]); "
            "print(type(m.model.vision_tower).__name__, family_of(m).name, type(p).__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["VisionTowerStandIn", "Gemma-3n", "Gemma3nProcessor"]


@pytest.fixture(scope="module")
def shared_teacher():
    """Three layers (sliding, full, sliding), the last one reusing layer 0's keys and values."""
    teacher, _ = FAMILY.build_tiny(hidden=16, layers=3, seed=5, kv_shared_layers=1)
    assert teacher.config.text_config.kv_sharing_modes == ["store", "store", "reuse"]
    return teacher


def _logits(model):
    ids = torch.randint(5, 390, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_keeping_every_layer_reproduces_the_teacher(shared_teacher):
    student, _ = select_layers(shared_teacher, layer_ids=[0, 1, 2])
    assert student.config.text_config.num_kv_shared_layers == 1
    torch.testing.assert_close(_logits(student), _logits(shared_teacher), rtol=0, atol=0)


def test_layer_selection_keeps_the_kept_layers_per_layer_blocks_and_lists(shared_teacher):
    student, kept = select_layers(shared_teacher, layer_ids=[0, 2])
    t_text, s_text = shared_teacher.config.text_config, student.config.text_config
    width = t_text.hidden_size_per_layer_input
    assert s_text.num_kv_shared_layers == 1  # layer 2 still reads layer 0's keys and values
    for key in ("layer_types", "activation_sparsity_pattern", "intermediate_size"):
        assert getattr(s_text, key) == [getattr(t_text, key)[i] for i in kept]
    t_lm, s_lm = shared_teacher.model.language_model, student.model.language_model
    blocks = [range(i * width, (i + 1) * width) for i in kept]
    columns = torch.tensor([j for block in blocks for j in block])
    torch.testing.assert_close(s_lm.embed_tokens_per_layer.weight, t_lm.embed_tokens_per_layer.weight[:, columns])
    torch.testing.assert_close(s_lm.per_layer_model_projection.weight, t_lm.per_layer_model_projection.weight[columns])
    assert torch.isfinite(_logits(student)).all()


@pytest.mark.parametrize(("kwargs", "kept"), [({"layer_ids": [1, 2]}, [1, 2]), ({"layers": 1}, [2])])
def test_a_kept_sharing_layer_without_its_attention_type_computes_its_own_keys_and_values(shared_teacher, kwargs,
                                                                                         kept):
    student, got = select_layers(shared_teacher, **kwargs)
    assert got == kept
    assert student.config.text_config.num_kv_shared_layers == 0
    # the last student layer (teacher layer 2, sliding) takes the projections of teacher layer 0, which it read
    source, own = (shared_teacher.model.language_model.layers[i].self_attn for i in (0, 2))
    s_attn = student.model.language_model.layers[-1].self_attn
    torch.testing.assert_close(s_attn.k_proj.weight, source.k_proj.weight)
    torch.testing.assert_close(s_attn.v_proj.weight, source.v_proj.weight)
    torch.testing.assert_close(s_attn.q_proj.weight, own.q_proj.weight)
    assert torch.isfinite(_logits(student)).all()
