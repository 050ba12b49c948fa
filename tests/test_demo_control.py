"""The demo's random-weight control: int8 where the fp32 ResNet34 would set the demo's pace."""

from __future__ import annotations

import torch


def test_the_demo_control_extracts_in_int8_only_on_cpus_without_bf16(monkeypatch):
    import fpstore.encoders.base as base
    from fpstore.demo import control_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(base, "native_bf16_flags", lambda: [])
    assert control_precision() == "int8"  # the fp32 ResNet34 would set the demo's pace
    monkeypatch.setattr(base, "native_bf16_flags", lambda: ["avx512_bf16"])
    assert control_precision() == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(base, "native_bf16_flags", lambda: [])
    assert control_precision() == "auto"
