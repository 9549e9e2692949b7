"""The error contract of SPEC §3: bad input raises ValueError/TypeError naming the argument and
the expected vs actual value."""
import pytest
import torch

from caad_kernels import ContrastiveKDLoss, contrastive_kd_loss

N, V = 3, 37
ERRORS = (ValueError, TypeError)


def _x(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


S, A, T = _x(N, V, seed=1), _x(N, V, seed=2), _x(N, V, seed=3)
Y = torch.tensor([0, 5, -100])


def _mentions(msg, value):
    """The message shows the actual value, in one of the usual spellings."""
    return any(form in msg for form in {str(value), repr(value), f"{value:g}"})


def _raises(match, *args, errors=ERRORS, **kwargs):
    args = args or (S, A, T, Y)
    with pytest.raises(errors, match=match) as info:
        contrastive_kd_loss(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- shapes and devices


def test_teacher_audio_vocab_mismatch():
    msg = _raises("teacher_audio_logits", S, _x(N, 29), T, Y)
    assert "29" in msg and "37" in msg, msg  # expected vs actual


def test_teacher_text_vocab_mismatch():
    msg = _raises("teacher_text_logits", S, A, _x(N, 29), Y)
    assert "29" in msg and "37" in msg, msg


def test_teacher_audio_rows_mismatch():
    _raises("teacher_audio_logits", S, _x(N + 2, V), T, Y)


def test_teacher_text_rows_mismatch():
    _raises("teacher_text_logits", S, A, _x(N + 2, V), Y)


def test_teacher_leading_shape_mismatch():
    """Same number of rows, different leading shape: [1, 3, V] vs [3, V] is still a mismatch
    of shapes (SPEC §3: a, t, s have the same shape [..., V])."""
    _raises("teacher_audio_logits", S.reshape(1, N, V), _x(3, 1, V), _x(1, N, V), None)


def test_labels_shape_mismatch():
    msg = _raises("labels", S, A, T, torch.tensor([0, 1]))
    assert "2" in msg and "3" in msg, msg


def test_labels_float_dtype():
    _raises("labels", S, A, T, torch.tensor([0.0, 1.0, 2.0]))


def test_labels_bool_dtype():
    _raises("labels", S, A, T, torch.tensor([True, False, True]))


def test_student_integer_dtype():
    _raises("student_logits", torch.zeros(N, V, dtype=torch.int64), A, T, Y)


def test_teacher_integer_dtype():
    _raises("teacher_audio_logits", S, torch.zeros(N, V, dtype=torch.int32), T, Y)


def test_device_mismatch():
    """A teacher on another device (the meta device stands in for a GPU here)."""
    msg = _raises("teacher_audio_logits", S, A.to("meta"), T, Y)
    assert "meta" in msg and "cpu" in msg, msg


def test_labels_device_mismatch():
    _raises("labels", S, A, T, Y.to("meta"))


def test_float64_needs_a_float64_backend():
    """Only the torch and cpu backends accumulate in float64; Triton refuses float64 logits."""
    s, a, t = (x.double() for x in (S, A, T))
    msg = _raises(r"float64", s, a, t, Y, backend="triton")
    assert "backend" in msg, msg


# ----------------------------------------------------------------------------- scalar options


@pytest.mark.parametrize("alpha", [-0.5, -1e-3])
def test_alpha_negative(alpha):
    msg = _raises("alpha", alpha=alpha)
    assert _mentions(msg, alpha), msg


@pytest.mark.parametrize("temperature", [0.0, -1.5])
def test_temperature_not_positive(temperature):
    msg = _raises("temperature", temperature=temperature)
    assert _mentions(msg, temperature), msg


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_plausibility_beta_out_of_range(beta):
    msg = _raises("plausibility_beta", plausibility_beta=beta)
    assert _mentions(msg, beta), msg


@pytest.mark.parametrize("beta", [-0.1, 1.01, 2.0])
def test_jsd_beta_out_of_range(beta):
    msg = _raises("jsd_beta", divergence="jsd", jsd_beta=beta)
    assert _mentions(msg, beta), msg


def test_unknown_divergence():
    msg = _raises("divergence", divergence="kl")
    assert "'kl'" in msg or '"kl"' in msg or " kl" in msg, msg
    assert "forward_kl" in msg, msg  # the expected values


def test_unknown_reduction():
    msg = _raises("reduction", reduction="batchmean")
    assert "batchmean" in msg and "mean" in msg.replace("batchmean", ""), msg


def test_unknown_backend():
    msg = _raises("backend", backend="tpu")
    assert "tpu" in msg, msg


def test_backend_unavailable_for_device():
    """A known backend that cannot run on the tensors' device: 'cuda' for CPU tensors."""
    _raises("backend", backend="cuda")


def test_reverse_kl_with_plausibility():
    """SPEC §2.4: reverse KL is infinite by construction with β_p > 0, so it is refused."""
    _raises(r"plausibility_beta|reverse_kl", divergence="reverse_kl", plausibility_beta=0.1)


def test_jsd_beta_one_with_plausibility():
    """jsd with jsd_beta = 1 is reverse KL: refused with β_p > 0 as well."""
    _raises(r"plausibility_beta|jsd_beta|reverse_kl", divergence="jsd", jsd_beta=1.0,
            plausibility_beta=0.1)


def test_hard_weight_without_labels():
    _raises(r"hard_weight|labels", S, A, T, None, hard_weight=0.5)


def test_text_missing_with_alpha():
    _raises("teacher_text_logits", S, A, None, Y, alpha=0.5)


def test_label_out_of_range_with_hard_weight():
    _raises("labels", S, A, T, torch.tensor([0, V, -100]), hard_weight=1.0)
    _raises("labels", S, A, T, torch.tensor([0, -7, -100]), hard_weight=1.0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_num_items_with_non_mean_reduction(reduction):
    _raises("num_items_in_batch", reduction=reduction, num_items_in_batch=4)


@pytest.mark.parametrize("nib", [0, -3])
def test_num_items_not_positive(nib):
    _raises("num_items_in_batch", num_items_in_batch=nib)


def test_module_validates_too():
    """ContrastiveKDLoss takes the same keywords and refuses the same bad values."""
    with pytest.raises(ERRORS, match="alpha"):
        ContrastiveKDLoss(alpha=-1.0)(S, A, T, Y)
    with pytest.raises(ERRORS, match="divergence"):
        ContrastiveKDLoss(divergence="kl")(S, A, T, Y)


@pytest.mark.parametrize("nib", [0, -3, 0.0, float("nan")], ids=["0", "-3", "0.0", "nan"])
def test_num_items_tensor_not_positive_on_cpu(nib):
    """A CPU tensor is checked like an int (no host sync is needed to read it); before, tensor(0) gave
    inf and tensor(-3) a negative loss."""
    msg = _raises("num_items_in_batch must be > 0", num_items_in_batch=torch.tensor(nib))
    assert "got" in msg, msg


def test_num_items_tensor_on_another_device():
    """A tensor neither on the CPU nor on the student's device is named, not a NotImplementedError."""
    _raises("num_items_in_batch must be on the CPU or on the student's device",
            num_items_in_batch=torch.tensor(3, device="meta"))


def test_num_items_tensor_bool():
    _raises("num_items_in_batch must be an integer or real tensor", num_items_in_batch=torch.tensor(True))


@pytest.mark.parametrize("layout", ["expanded_rows", "expanded_vocab", "as_strided_overlap"])
def test_inplace_backward_refuses_overlapping_student(layout):
    """Writing each row's gradient into memory shared with other rows would corrupt what the
    backward still reads (a silently wrong gradient before); a clear error instead."""
    base = _x(1, V, seed=4)
    if layout == "expanded_rows":
        s = base.expand(N, V)
    elif layout == "expanded_vocab":
        s = _x(N, 1, seed=4).expand(N, V)
    else:
        s = torch.as_strided(_x(N * V, seed=4), (N, V), (V // 2, 1))
    msg = _raises("inplace_backward=True .*overlap", s, A, T, Y, inplace_backward=True)
    assert str(tuple(s.stride())) in msg and "contiguous()" in msg, msg
    # Without inplace_backward the same layout is fine (and refused nowhere else).
    contrastive_kd_loss(s, A, T, Y, backend="torch")


def test_inplace_backward_accepts_non_overlapping_views():
    """A shifted 3-D view (logits[:, :-1]) and a transposed block do not overlap: accepted."""
    x = _x(2, N + 1, V, seed=5)
    contrastive_kd_loss(x[:, :-1], A.expand(2, N, V), T.expand(2, N, V), inplace_backward=True, backend="torch")
    contrastive_kd_loss(_x(V, N, seed=6).t(), A, T, inplace_backward=True, backend="torch")


def test_fused_linear_label_out_of_range_with_hard_weight():
    """One label check for both entry points: fused-linear returned NaN where contrastive_kd_loss raised."""
    from caad_kernels import fused_linear_contrastive_kd_loss

    h, w = _x(N, 8, seed=7), _x(V, 8, seed=8)
    for bad in (V, -7):
        labels = torch.tensor([0, bad, -100])
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\) or ignore_index=-100, got {bad}"):
            fused_linear_contrastive_kd_loss(h, w, h, h, w, labels, hard_weight=1.0)
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\) or ignore_index=-100, got {bad}"):
            contrastive_kd_loss(S, A, T, labels, hard_weight=1.0)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fused_linear_contrastive_kd_loss(h, w, h, h, w, torch.zeros(N), hard_weight=1.0)
