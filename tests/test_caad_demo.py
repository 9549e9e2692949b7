"""Pieces of the built-in demo (caad.demo) that the end-to-end run in test_caad_cli.py cannot pin down."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from caad.demo import DemoSettings, _both_views_trainer  # noqa: E402
from caad.synthetic import CUE_WORDS, beep_records  # noqa: E402
from caad.teacher import DualViewCollator  # noqa: E402
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio  # noqa: E402


def test_teacher_loss_is_the_mean_of_both_views_cross_entropies(tmp_path):
    """The demo teacher learns the text-only view too: its loss is (CE(audio view) + CE(text view)) / 2."""
    from transformers import TrainingArguments

    tok = build_tokenizer(CUE_WORDS)
    proc = build_processor(tok)
    model = tiny_qwen2_audio(tok, hidden=32, layers=1, seed=5)
    records = beep_records(4, seed=2, conditions={"faithful": 0.5, "adversarial": 0.25, "neutral": 0.25})
    examples = [{"audio": r["audio"]["array"], "instruction": r["instruction"], "pseudo_gt": r["label"]}
                for r in records]
    batch = DualViewCollator(proc)(examples)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    trainer = _both_views_trainer()(model=model, args=args, data_collator=DualViewCollator(proc))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        # independent: token-mean CE of each view from the logits, with the causal shift
        expected = []
        for view in ("audio_view", "text_view"):
            inputs = {k: v for k, v in batch[view].items() if k != "labels"}
            logits = model(**inputs).logits[:, :-1].double()
            labels = batch[view]["labels"][:, 1:]
            expected.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                              labels.reshape(-1), ignore_index=-100))
    assert "audio_features" not in batch["text_view"] and "input_features" not in batch["text_view"]
    torch.testing.assert_close(loss.double(), 0.5 * (expected[0] + expected[1]), rtol=1e-5, atol=1e-6)


def test_demo_settings_defaults_match_the_documented_recipe():
    s = DemoSettings()
    cues = s.train_conditions
    assert abs(sum(cues.values()) - 1) < 1e-9 and 0.8 <= cues["faithful"] / (1 - cues["neutral"]) <= 0.9
    assert set(s.eval_conditions) == {"faithful", "adversarial", "neutral"} and len(s.seeds) >= 2
    assert len(s.study_seeds) >= 3 and {0.5, 1.0, 2.0} <= set(s.study_alphas) and 0.0 in s.study_plausibility_betas
    assert s.loss["alpha"] == 1.0


def test_full_study_flag_reaches_the_demo(monkeypatch):
    import caad.demo
    from caad.cli import main

    seen = {}
    monkeypatch.setattr(caad.demo, "run_demo", lambda settings: seen.setdefault("s", settings))
    assert main(["train", "--full-study", "--output-dir", "somewhere"]) == 0
    assert seen["s"].full_study is True and seen["s"].output_dir == "somewhere"
    seen.clear()
    main(["train"])
    assert seen["s"].full_study is False
