"""Fetch MTCNN (PNet, RNet, ONet) weights from the facenet-pytorch wheel; export; convert.

Source: ``facenet-pytorch==2.6.0`` wheel (MIT), ``facenet_pytorch/data/{p,r,o}net.pt``
(state dicts in torch's legacy format, so torch reads them: ``pip install torch==2.13.0``
uses the local CPU wheel). The three nets are defined here with the same layer names as
``facenet_pytorch/models/mtcnn.py`` (facenet-pytorch itself needs torchvision, which has no
CPU build here), exported to ONNX at fixed input sizes and converted to MNN; the golden
data come from the ONNX files through onnxruntime.

Run: ``python models/fetch_mtcnn.py`` -> prints the paths (cached, idempotent).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cache import cache_dir, download_wheel, extract_member

REQUIREMENT = "facenet-pytorch==2.6.0"
#: net -> (input size HxW used for export, output names)
NETS: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = {
    "pnet": ((48, 48), ("boxes", "probs")),
    "rnet": ((24, 24), ("boxes", "probs")),
    "onet": ((48, 48), ("boxes", "landmarks", "probs")),
}


def _define(torch: Any) -> dict[str, Any]:
    nn = torch.nn

    class PNet(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
            self.prelu1 = nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
            self.prelu2 = nn.PReLU(16)
            self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
            self.prelu3 = nn.PReLU(32)
            self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
            self.softmax4_1 = nn.Softmax(dim=1)
            self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

        def forward(self, x: Any) -> Any:
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))

    class RNet(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
            self.prelu1 = nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
            self.prelu2 = nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
            self.prelu3 = nn.PReLU(64)
            self.dense4 = nn.Linear(576, 128)
            self.prelu4 = nn.PReLU(128)
            self.dense5_1 = nn.Linear(128, 2)
            self.softmax5_1 = nn.Softmax(dim=1)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x: Any) -> Any:
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))

    class ONet(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
            self.prelu1 = nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
            self.prelu2 = nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
            self.prelu3 = nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
            self.prelu4 = nn.PReLU(128)
            self.dense5 = nn.Linear(1152, 256)
            self.prelu5 = nn.PReLU(256)
            self.dense6_1 = nn.Linear(256, 2)
            self.softmax6_1 = nn.Softmax(dim=1)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x: Any) -> Any:
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))

    return {"pnet": PNet, "rnet": RNet, "onet": ONet}


def _export(torch: Any, name: str, weights: Path, onnx_path: Path) -> None:
    net = _define(torch)[name]()
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    net.load_state_dict(state)  # strict: every layer name must match
    net.eval()
    (h, w), outputs = NETS[name]
    dummy = torch.zeros(1, 3, h, w)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still exact
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (dummy,), str(onnx_path), input_names=["input"],
                          output_names=list(outputs), opset_version=13, dynamo=False)


def fetch() -> dict[str, Path]:
    """For each net: ``<net>.onnx``, ``<net>.mnn`` (checked against onnxruntime), golden."""
    from fleet.artifacts.convert import convert_model
    from fleet.artifacts.reference import make_golden

    out = cache_dir() / "mtcnn"
    out.mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    wheel: Path | None = None
    for name in NETS:
        onnx_path = out / f"{name}.onnx"
        if not onnx_path.is_file():
            import torch

            wheel = wheel or download_wheel(REQUIREMENT, "facenet_pytorch-2.6.0")
            weights = extract_member(wheel, f"facenet_pytorch/data/{name}.pt",
                                     out / f"{name}.pt")
            tmp = onnx_path.with_suffix(".onnx.part")
            _export(torch, name, weights, tmp)
            tmp.replace(onnx_path)
        mnn = out / f"{name}.mnn"
        if not mnn.is_file():
            convert_model(onnx_path, mnn)
        golden = out / f"{name}.golden.npz"
        if not golden.is_file():
            golden.write_bytes(make_golden(onnx_path, n=2, seed=0))
        paths.update({f"{name}.onnx": onnx_path, f"{name}.mnn": mnn,
                      f"{name}.golden": golden})
    return paths


if __name__ == "__main__":
    for key, path in fetch().items():
        print(f"{key}: {path}")
