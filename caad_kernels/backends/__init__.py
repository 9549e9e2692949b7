"""Backends: each module offers ``forward(s, a, t, labels, opts)`` and
``backward(grad_rows, s, a, t, labels, stats, opts, out)`` over the same inputs."""
