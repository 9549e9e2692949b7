"""Teacher and student must index one vocabulary: the KD loss compares their logits column by column.

``vocab_size`` alone cannot tell: heads are padded (Qwen pads 151,665 tokens to 151,936 columns), so two
checkpoints with one tokenizer report different sizes, and two different tokenizers may report the same one.
The check compares the token -> id maps themselves.
"""

from __future__ import annotations

from typing import Any


def _tokenizer_of(obj: Any) -> Any:
    return getattr(obj, "tokenizer", obj)  # a processor carries its tokenizer


def check_shared_vocabulary(teacher: Any, student: Any) -> None:
    """Raise ``ValueError`` unless ``teacher`` and ``student`` (tokenizers or processors) map every token to the
    same id. The message names both sizes and the first id whose token differs (or that only one side has)."""
    t_vocab, s_vocab = _tokenizer_of(teacher).get_vocab(), _tokenizer_of(student).get_vocab()
    if t_vocab == s_vocab:
        return
    t_by_id = {i: tok for tok, i in t_vocab.items()}
    s_by_id = {i: tok for tok, i in s_vocab.items()}
    for i in sorted(set(t_by_id) | set(s_by_id)):
        t_tok, s_tok = t_by_id.get(i), s_by_id.get(i)
        if t_tok != s_tok:
            raise ValueError(
                f"the teacher's and the student's tokenizers differ: teacher {len(t_vocab)} tokens, student "
                f"{len(s_vocab)} tokens; first difference at id {i}: teacher {t_tok!r}, student {s_tok!r}. "
                "The KD loss compares logits id by id, so both models must share one tokenizer (pairs of one family "
                "across sizes do); a padded head with more columns than tokens is fine")
    # Same id -> token pairs but different maps: one token at two ids on one side.
    raise ValueError(f"the teacher's and the student's tokenizers differ: teacher {len(t_vocab)} tokens, student "
                     f"{len(s_vocab)} tokens, with the same tokens at different ids")
