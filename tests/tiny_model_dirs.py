"""Tiny random teacher and student folders (``save_pretrained`` + processor) and a labelled JSONL, for CLI tests."""

from pathlib import Path


def make_model_dirs(root: Path, n_records: int = 4) -> Path:
    """``root/teacher``, ``root/student`` (tiny Qwen2-Audio, random) and ``root/data.jsonl`` (beeps records)."""
    from caad.data import load_records, save_jsonl
    from caad.synthetic import beep_records
    from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    for name, hidden, layers, seed in (("teacher", 32, 1, 7), ("student", 16, 1, 1)):
        model = tiny_qwen2_audio(tokenizer, hidden=hidden, layers=layers, seed=seed)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    save_jsonl(load_records(beep_records(n_records, seed=2))[0], root / "data.jsonl")
    return root
