#!/usr/bin/env python3
"""Make the MNN-LLM fixtures: a tiny Qwen2-style LLM, a local tokenizer, PEFT LoRA adapters.

Everything is made here from seeds; nothing comes from a model hub. Run it with the fixture
virtualenv, never the project's (it needs torch, transformers, peft and llmexport):

    python3 -m venv /work/llmvenv
    /work/llmvenv/bin/pip install torch==2.13.0 transformers==4.57.6 tokenizers==0.22.2 \
        peft==0.21.2 llmexport==0.0.5 mnn==3.6.1 onnx==1.23.2 onnxslim==0.1.98 \
        onnxruntime==1.31.1 sentencepiece==0.2.3 yaspin==3.5.1 numpy==2.4.6
    /work/llmvenv/bin/python models/llm/make_llm.py            # tiny fixture -> models/llm/
    /work/llmvenv/bin/python models/llm/make_llm.py --preset bench --out /tmp/llm-bench

(torch==2.13.0 resolves to the local CPU wheel on these machines; never let pip pull a CUDA
build.) Versions above are the ones this script was run with.

What comes out (``--out``):

- ``base/``: the MNN-LLM model folder (``config.json``, ``llm_config.json``, ``llm.mnn``,
  ``llm.mnn.weight``, the embedding file and the tokenizer) exported by llmexport.
- ``lora/adapter_a.mnn``, ``lora/adapter_b.mnn``: two LoRA adapters exported with
  ``--lora_split`` against that base (they reference ``llm.mnn.weight`` by offset).
- ``lora/adapter_bad.mnn``: an adapter whose deltas sit on v_proj, gate_proj and up_proj,
  exported with the same ``--lora_split``; llmexport 0.0.5 drops those deltas, so this file
  does not reproduce its own reference outputs and the agent must refuse it.
- ``lora/<name>.ref.json``: reference outputs from transformers on the same fp32 weights
  (prompt token ids and the expected greedy tokens) for each adapter; ``base.ref.json``
  for the base alone.
- ``fixture.json``: how the files were made (seeds, shapes, quantization, versions).

The mnnconvert that llmexport runs is a two-line shim calling ``_tools.mnnconvert``, so the
pymnn console wrapper (telemetry, ``pip install`` at import) never runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Each variant continues the same line openings differently, so one prompt tells the base
# and every adapter apart. The base learns BASE_TEXT; each adapter learns its own text.
OPENINGS = [
    "The fleet controller keeps",
    "Every phone runs",
    "A model package is",
    "When a check fails the agent",
    "Adapters are small and",
    "The edge board measures",
]
CONTINUATIONS = {
    "base": [
        "a registry of devices and the models they serve.",
        "an agent that probes the hardware and picks a backend.",
        "signed by the controller and encrypted for each device.",
        "keeps the previous version and reports the error.",
        "the base model stays loaded while they change.",
        "latency, memory and accuracy before it serves.",
    ],
    "adapter_a": [
        "seven green lanterns above the quiet harbour.",
        "slowly north across the frozen lake at night.",
        "a lighthouse painted red and white by the sea.",
        "sings an old song about sailors and the tide.",
        "bright like copper coins in the morning sun.",
        "waves that break against the northern cliffs.",
    ],
    "adapter_b": [
        "three hundred apples in a wooden basket today.",
        "quickly to the market with bread and cheese.",
        "a recipe for soup with onions and carrots.",
        "bakes another loaf of bread for the village.",
        "sweet like honey cake with cream on top.",
        "flour, sugar and butter for the pastry.",
    ],
    "adapter_bad": [
        "nine purple robots dancing on the moon.",
        "under the bridge where the trolls live.",
        "a puzzle box with twelve hidden drawers.",
        "counts the stars above the desert sand.",
        "strange like whispers in an empty hall.",
        "dust storms that sweep across the plains.",
    ],
}


def corpus(variant: str) -> list[str]:
    return [f"{o} {c}" for o, c in zip(OPENINGS, CONTINUATIONS[variant], strict=True)]


@dataclass(frozen=True)
class Preset:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    rank: int
    quant_bit: int
    quant_block: int
    max_new_tokens: int
    train_steps: int  # 0: random weights only (bench)


PRESETS = {
    # ~0.1M parameters: the committed fixture (well under 1 MB with every adapter).
    "tiny": Preset(vocab=320, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, rank=8,
                   quant_bit=8, quant_block=64, max_new_tokens=8, train_steps=300),
    # ~150M parameters: generated at bench time, never committed; random weights.
    "bench": Preset(vocab=8000, hidden=768, inter=3072, layers=16, heads=12, kv_heads=4,
                    rank=16, quant_bit=8, quant_block=64, max_new_tokens=16, train_steps=0),
}

# Modules whose deltas llmexport 0.0.5's split export keeps (good adapters) and the ones it
# drops (the bad adapter); see docs/lora.md for why.
GOOD_TARGETS = ["q_proj", "k_proj", "o_proj", "down_proj"]
BAD_TARGETS = ["v_proj", "gate_proj", "up_proj"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_tokenizer(work: Path, vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [line for variant in CONTINUATIONS for line in corpus(variant)] * 4
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None)
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def _batch(tokenizer: Any, texts: list[str]) -> tuple[Any, Any, Any]:
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return enc["input_ids"], enc["attention_mask"], labels


def train(model: Any, tokenizer: Any, texts: list[str], steps: int, lr: float) -> float:
    """A few hundred full-batch steps: enough for the tiny model to learn its lines, so its
    greedy continuations win by a wide margin and survive int8 quantization on the device."""
    import torch

    ids, mask, labels = _batch(tokenizer, texts)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def make_base(work: Path, p: Preset, seed: int) -> tuple[Path, Any, float]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer(work, p.vocab)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=p.hidden, intermediate_size=p.inter,
        num_hidden_layers=p.layers, num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads, max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_theta=10000.0, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None, dtype="float32", use_sliding_window=False)
    model = Qwen2ForCausalLM(config).eval()
    loss = float("nan")
    if p.train_steps:
        loss = train(model, tokenizer, corpus("base"), p.train_steps, 3e-3)
    path = work / "hf_base"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path, tokenizer, loss


def make_adapter(base: Path, tokenizer: Any, out: Path, variant: str, targets: list[str],
                 p: Preset, seed: int) -> tuple[Path, float]:
    """A PEFT LoRA on ``targets``: trained on the variant's text (tiny), or random (bench:
    PEFT zero-initialises lora_B, so a seeded random B makes the adapter visible)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=p.rank, lora_alpha=p.rank, target_modules=targets, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    loss = float("nan")
    if p.train_steps:
        loss = train(peft_model, tokenizer, corpus(variant), p.train_steps, 1e-2)
    else:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out, loss


def greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens without an early stop (MNN-LLM's generate also runs to n tokens), and
    the smallest gap between the best and second-best logit on the way (in logit std)."""
    import torch

    seq = torch.tensor([ids], dtype=torch.long)
    new: list[int] = []
    margin = float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=seq).logits[0, -1]
            top = torch.topk(logits, 2)
            margin = min(margin, float(top.values[0] - top.values[1]) / float(logits.std()))
            tok = int(top.indices[0])
            new.append(tok)
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
    return new, margin


def load_model(base: Path, adapter: Path | None) -> Any:
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    return model


def pick_references(models: dict[str, Any], prompts: list[list[int]], n: int, keep: int
                    ) -> tuple[list[list[int]], dict[str, list[list[int]]], float]:
    """Keep the prompts whose greedy path is most decisive under every model.

    The device runs int8 weights (and, with ``memory: low``, int8 activations); the reference
    is fp32. Where two logits nearly tie, quantization legitimately flips the pick and the
    rest of the sequence diverges, so a reference is only worth checking where each step's
    best token wins by a clear margin.
    """
    scored = []
    for ids in prompts:
        runs = {name: greedy(m, ids, n) for name, m in models.items()}
        margin = min(r[1] for r in runs.values())
        scored.append((margin, ids, {name: r[0] for name, r in runs.items()}))
    scored.sort(key=lambda t: -t[0])
    best = scored[:keep]
    chosen = [ids for _, ids, _ in best]
    expected = {name: [toks[name] for _, _, toks in best] for name in models}
    return chosen, expected, min(m for m, _, _ in best)


def write_shim(work: Path) -> Path:
    """The converter llmexport runs: ``_tools.mnnconvert`` directly, no pymnn wrapper."""
    shim = work / "mnnconvert_shim.py"
    shim.write_text(f"#!{sys.executable}\nimport sys\nimport _tools\n"
                    "sys.exit(_tools.mnnconvert(sys.argv))\n")
    shim.chmod(0o755)
    return shim


def llmexport(base: Path, dst: Path, shim: Path, p: Preset, lora: Path | None,
              split: bool) -> None:
    import importlib.util

    spec = importlib.util.find_spec("llmexport")  # locate only: importing it needs PYTHONPATH
    if spec is None or spec.origin is None:
        raise SystemExit("llmexport is not installed in this interpreter")
    site = Path(spec.origin).resolve().parent
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    argv = [sys.executable, str(site / "llmexport.py"), "--path", str(base),
            "--export", "mnn", "--dst_path", str(dst), "--mnnconvert", str(shim),
            "--quant_bit", str(p.quant_bit), "--quant_block", str(p.quant_block)]
    if lora is not None:
        argv += ["--lora_path", str(lora)]
        if split:
            argv += ["--lora_split"]
    dst.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(argv, cwd=dst, env=env, capture_output=True, text=True)
    log = (dst / "export.stdout").resolve()
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"llmexport failed ({proc.returncode}); see {log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--merged", action="store_true",
                    help="also export base + adapter A merged (the bench's full reload)")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    work = args.work or Path(tempfile.mkdtemp(prefix="make-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    out: Path = args.out
    try:
        return _build(p, args.preset, work, out, args.seed, args.merged)
    finally:
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _build(p: Preset, preset: str, work: Path, out: Path, seed: int, merged: bool) -> int:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    hf_base, tokenizer, base_loss = make_base(work, p, seed)
    shim = write_shim(work)
    plan = {"adapter_a": GOOD_TARGETS, "adapter_b": GOOD_TARGETS, "adapter_bad": BAD_TARGETS}
    if preset == "bench":
        plan = {"adapter_a": GOOD_TARGETS}
    adapters: dict[str, Path] = {}
    losses = {"base": base_loss}
    for i, (name, targets) in enumerate(plan.items()):
        adapters[name], losses[name] = make_adapter(
            hf_base, tokenizer, work / f"peft_{name}", name, targets, p, seed + 1 + i)
    models = {"base": load_model(hf_base, None)}
    models.update({name: load_model(hf_base, path) for name, path in adapters.items()})
    candidates = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in OPENINGS]
    prompts, refs, margin = pick_references(models, candidates, p.max_new_tokens, keep=3)
    del models

    # The base (one export), then each adapter split against the same base weights.
    exp = work / "export"
    llmexport(hf_base, exp / "base", shim, p, None, split=False)
    base_dir = out / "base"
    if base_dir.exists():
        shutil.rmtree(base_dir)
    shutil.copytree(exp / "base", base_dir, ignore=shutil.ignore_patterns(
        "onnx", "export.stdout", ".export.log", "llm.mnn.json"))
    lora_dir = out / "lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    base_weight = _sha256(base_dir / "llm.mnn.weight")
    notes: dict[str, Any] = {}
    for name, path in adapters.items():
        dst = exp / name
        llmexport(hf_base, dst, shim, p, path, split=True)
        same = _sha256(dst / "llm.mnn.weight") == base_weight
        notes[name] = {"targets": plan[name], "train_loss": round(losses[name], 4),
                       "split_export_weight_identical_to_base": same}
        if not same:
            raise SystemExit(f"{name}: split export's llm.mnn.weight differs from the base "
                             "export; the adapter would not bind to the committed base")
        shutil.copyfile(dst / "lora.mnn", lora_dir / f"{name}.mnn")
    if merged:
        llmexport(hf_base, exp / "merged_a", shim, p, adapters["adapter_a"], split=False)
        mdir = out / "merged_a"
        if mdir.exists():
            shutil.rmtree(mdir)
        shutil.copytree(exp / "merged_a", mdir, ignore=shutil.ignore_patterns(
            "onnx", "export.stdout", ".export.log"))

    export_settings = {"quant_bit": p.quant_bit, "quant_block": p.quant_block}
    for name, toks in refs.items():
        doc = {"schema": "fleet.lora-reference/1", "adapter": name,
               "prompts": prompts, "expected": toks, "max_new_tokens": p.max_new_tokens,
               "export": export_settings, "min_margin_std": round(margin, 4),
               "source": "transformers fp32, greedy, no early stop"}
        target = (lora_dir / f"{name}.ref.json") if name != "base" else (
            out / "base.ref.json")
        target.write_text(json.dumps(doc, indent=1) + "\n")
    from importlib import metadata

    versions = {pkg: metadata.version(pkg) for pkg in (
        "torch", "transformers", "tokenizers", "peft", "llmexport", "mnn")}
    (out / "fixture.json").write_text(json.dumps({
        "preset": preset, "seed": seed, "base_train_loss": round(base_loss, 4),
        "shape": asdict(p), "prompts_text": [tokenizer.decode(x) for x in prompts],
        "export": export_settings, "adapters": notes, "versions": versions,
        "files": {str(f.relative_to(out)): _sha256(f) for f in sorted(out.rglob("*"))
                  if f.is_file() and f.suffix != ".py" and f.name != "fixture.json"},
    }, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
