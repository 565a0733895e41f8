"""What the benchmark scripts share (they import it as `common`, from their own folder)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on the loopback interface, for a job's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resnet50_param_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50, in registration order (no torchvision needed;
    test_kernels.py pins the 25,557,032 parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]
