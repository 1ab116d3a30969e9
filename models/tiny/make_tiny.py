"""Build the tiny models committed next to this script (no torch, no downloads).

- ``tiny.onnx`` -> ``tiny.mnn``: a 3-layer conv net on a 1x3x64x64 image with a 10-way
  softmax, seeded numpy weights (He init). About 100 KB; used by the demo and fast tests.
  ``tiny.golden.npz``: onnxruntime outputs on 2 seeded inputs (``fleet.golden/1``).
- ``outlier.onnx`` -> ``outlier.mnn``: a model that weight quantization breaks, as some
  real detection/segmentation models break (FIELD-NOTES 5). Four "dead" channels (a ReLU
  after a bias of -1000: always zero) feed the next conv through weights of +-60, next
  to ordinary weights of ~0.1. In float the big weights multiply zeros and do nothing; per
  channel 8- or 4-bit quantization spends its whole range on them and rounds the ordinary
  weights to zero, so the quantized model's output collapses. ``outlier.golden.npz`` holds
  the float model's outputs. A health check must refuse ``outlier`` as wq4/wq8 and accept
  it as float.

Run: ``python models/tiny/make_tiny.py`` (rewrites the files; output is deterministic).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent


def _conv(rng: np.random.Generator, name: str, cin: int, cout: int, k: int = 3
          ) -> list[onnx.TensorProto]:
    w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
    return [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str,
           inp: tuple[str, list[int]], out: tuple[str, list[int]]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(inp[0], TensorProto.FLOAT, inp[1])],
        [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="mnn-fleet make_tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_onnx() -> onnx.ModelProto:
    rng = np.random.default_rng(20240501)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    prev = "input"
    for i, (cin, cout) in enumerate([(3, 16), (16, 32), (32, 64)]):
        inits += _conv(rng, f"c{i}", cin, cout)
        nodes.append(helper.make_node("Conv", [prev, f"c{i}_w", f"c{i}_b"], [f"c{i}"],
                                      pads=[1, 1, 1, 1], strides=[2, 2]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((64, 10)) * 0.1).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], axis=1))
    return _model(nodes, inits, "tiny", ("input", [1, 3, 64, 64]), ("prob", [1, 10]))


def outlier_onnx() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    w_dead = (rng.standard_normal((4, 8, 3, 3)) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(w_dead, "dead_w"),
              numpy_helper.from_array(np.full(4, -1000.0, np.float32), "dead_b")]
    nodes.append(helper.make_node("Conv", ["input", "dead_w", "dead_b"], ["dead_pre"],
                                  pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["dead_pre"], ["dead"]))
    nodes.append(helper.make_node("Concat", ["input", "dead"], ["cat"], axis=1))
    w1 = (rng.standard_normal((32, 12, 3, 3)) * 0.1).astype(np.float32)
    w1[:, 8:, 1, 1] = np.where(rng.random((32, 4)) < 0.5, -60.0, 60.0)
    inits += [numpy_helper.from_array(w1, "c1_w"),
              numpy_helper.from_array((rng.standard_normal(32) * 0.01).astype(np.float32),
                                      "c1_b")]
    nodes.append(helper.make_node("Conv", ["cat", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"]))
    inits += _conv(rng, "c2", 32, 16)
    nodes.append(helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["features"],
                                  pads=[1, 1, 1, 1], strides=[2, 2]))
    return _model(nodes, inits, "outlier", ("input", [1, 8, 16, 16]),
                  ("features", [1, 16, 8, 8]))


def build(out_dir: Path = HERE) -> dict[str, Path]:
    """Write the ONNX, MNN and golden files into ``out_dir``; return their paths."""
    sys.path.insert(0, str(HERE.parents[1]))
    from fleet.artifacts.convert import convert_model
    from fleet.artifacts.reference import make_golden

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, make in (("tiny", tiny_onnx), ("outlier", outlier_onnx)):
        onnx_path = out_dir / f"{name}.onnx"
        onnx.save(make(), str(onnx_path))
        mnn_path = out_dir / f"{name}.mnn"
        convert_model(onnx_path, mnn_path)  # checked against onnxruntime
        golden_path = out_dir / f"{name}.golden.npz"
        golden_path.write_bytes(make_golden(onnx_path, n=2, seed=0))
        paths.update({f"{name}.onnx": onnx_path, f"{name}.mnn": mnn_path,
                      f"{name}.golden.npz": golden_path})
    return paths


if __name__ == "__main__":
    for key, path in build().items():
        print(f"{key}: {path} ({path.stat().st_size} bytes)")
