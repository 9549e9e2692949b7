"""A child-process probe of the C++ kernels' first use (shared by tests/test_jit.py and tests/test_native.py):
build or load them, run the loss through ``auto`` and through ``backend="cpu"``, and print what happened, one
prefixed line each (KINDS, WARNINGS, CLOSE, EXPLICIT) for the parent to check."""

LOAD_AND_USE = """
    import warnings, torch, caad_kernels
    from caad_kernels import jit, contrastive_kd_loss
    s, a, t = torch.randn(3, 11), torch.randn(3, 11), torch.randn(3, 11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kinds = jit.load()
        loss = contrastive_kd_loss(s, a, t)
    ref = contrastive_kd_loss(s, a, t, backend="torch")
    print("KINDS", sorted(kinds), jit.origin())
    print("WARNINGS", [str(w.message) for w in caught])
    print("CLOSE", bool(torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)))
    try:
        contrastive_kd_loss(s, a, t, backend="cpu")
        print("EXPLICIT ok")
    except Exception as e:
        print("EXPLICIT", type(e).__name__, e)
"""
