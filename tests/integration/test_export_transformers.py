"""transformers (the peer venv, /work/peer-venv: torch + transformers 5) loads every `convert --to hf` export and
computes the toolkit's logits: Llama 3.1 with rope_scaling (llama3), Qwen2 tied with q/k/v bias, Qwen3 with q/k
norm and head_dim, Llama GQA untied; its tokenizer renders the chat template to the golden ids and its generation
config keeps the EOS list. The HF GPTQ layout of the same models: transformers needs optimum + a GPTQ kernel
package to load it, absent there (the script records the loader's refusal and compares logits when it does load);
otherwise the layout is dequantized with the AutoGPTQ formula written in the script and loaded into the model
transformers builds from the exported config.json, whose logits must equal the toolkit's quantized model's.
One subprocess for all exports."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.cli.main import main as cli_main
from ascend_llm.config.quant import QuantConfig
from ascend_llm.interop.quantized import export_hf_gptq
from ascend_llm.interop.source import open_model
from ascend_llm.quant.apply import apply_quantization
from tests.unit.test_hf_export import FIXTURES, source_dir

pytestmark = pytest.mark.integration
PEER_PYTHON = Path(os.environ.get("ASCEND_LLM_PEER_PYTHON", "/work/peer-venv/bin/python"))
FAMILIES = ["llama31", "qwen2_tied", "qwen3_qknorm", "llama_gqa"]
GOLDEN = {"llama31": "llama_gqa"}

PEER_SCRIPT = r'''
import json, sys
try:
    import numpy as np, torch, transformers
    from safetensors.numpy import load_file
except ImportError as exc:
    print(json.dumps({"skip": f"peer python lacks {exc.name}"})); sys.exit(0)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

def autogptq_state_dict(root):
    """AutoGPTQ's dequantization of qweight/qzeros/scales/g_idx, in NumPy: float32 `.weight` tensors."""
    qc = json.load(open(f"{root}/config.json"))["quantization_config"]
    bits, mask = qc["bits"], (1 << qc["bits"]) - 1
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    t, sd = load_file(f"{root}/model.safetensors"), {}
    for k, v in t.items():
        if k.endswith(".qweight"):
            p = k[: -len(".qweight")]
            qw, qz = v.view(np.uint32), t[p + ".qzeros"].view(np.uint32)
            q = ((qw[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qw.shape[1]).astype(np.float64)
            z = ((qz[:, :, None] >> shifts[None, None, :]) & mask).reshape(qz.shape[0], -1).astype(np.float64)
            z = z + 1 if qc["checkpoint_format"] == "gptq" else z
            g = t[p + ".g_idx"].astype(np.int64)
            sd[p + ".weight"] = torch.tensor((t[p + ".scales"].astype(np.float64)[g] * (q - z[g])).T.astype(np.float32))
        elif not k.endswith((".qzeros", ".scales", ".g_idx")):
            sd[k] = torch.tensor(v.astype(np.float32))
    return sd

def gptq_model(root):
    try:  # the real loader, when this venv has what it needs
        return AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32), "from_pretrained"
    except Exception as exc:
        refusal = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    config = AutoConfig.from_pretrained(root)
    del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(autogptq_state_dict(root), strict=False)
    assert not unexpected and all("rotary" in m or (config.tie_word_embeddings and m == "lm_head.weight")
                                  for m in missing), (missing, unexpected)
    model.tie_weights()
    return model, "dequantized (" + refusal + ")"

results = {}
for case in json.load(open(sys.argv[1])):
    root = case["dir"]
    if case["kind"] == "hf":
        model, how = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32), "from_pretrained"
    else:
        model, how = gptq_model(root)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([case["ids"]])).logits[0].double().numpy()
    expected = np.load(case["expected"])
    out = {"class": type(model).__name__, "how": how, "max_abs": float(np.abs(logits - expected).max()),
           "scale": float(np.abs(expected).max()),
           "rope_type": getattr(model.config, "rope_parameters", {}).get("rope_type"),
           "eos": GenerationConfig.from_pretrained(root).eos_token_id}
    tok = AutoTokenizer.from_pretrained(root)
    out["chat_ids"] = list(tok.apply_chat_template(case["chat"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
    results[f"{case['kind']}:{case['name']}"] = out
print(json.dumps(results))
'''


def peer_python() -> Path:
    if not PEER_PYTHON.is_file():
        pytest.skip(f"no peer python at {PEER_PYTHON} (a venv with torch + transformers)")
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    return PEER_PYTHON


def round_to_fp16(model) -> None:
    """Round every float32 parameter to float16 precision: what the GPTQ layout stores outside the quantized
    layers, so that the toolkit's quantized model and the export hold the same numbers."""
    for param in model.get_parameters():
        if param.dtype == ms.float32:
            param.set_data(Tensor(param.asnumpy().astype(np.float16).astype(np.float32)))


def logits(model, ids: list[int]) -> np.ndarray:
    return model(Tensor(np.array([ids], np.int32))).asnumpy()[0].astype(np.float64)


def build_exports(tmp_path: Path) -> tuple[list[dict], dict]:
    """`convert --to hf` and the HF GPTQ layout of every family, with the toolkit's logits on the same ids."""
    cases, goldens = [], {}
    for name in FAMILIES:
        qcfg = QuantConfig(bits=4, group_size=16, sym=True, include_output=name == "llama_gqa")  # lm_head too
        src = source_dir(name, tmp_path)
        golden = json.loads((FIXTURES / f"{GOLDEN.get(name, name)}.golden.json").read_text())
        goldens[name] = golden
        rng = np.random.default_rng(len(name))
        ids = golden["text_input_ids"] + rng.integers(0, 500, size=64).tolist()  # positions past 64 (llama3 band)
        hf_dir = tmp_path / f"hf_{name}"
        assert cli_main(["convert", str(src), "--to", "hf", "--output", str(hf_dir), "--dtype", "fp32"]) == 0
        opened = open_model(src)
        np.save(tmp_path / f"hf_{name}.npy", logits(opened.model, ids))
        qweights = apply_quantization(opened.model, qcfg)
        round_to_fp16(opened.model)
        gptq_dir = export_hf_gptq(opened.model, opened.config, qcfg, qweights, tmp_path / f"gptq_{name}",
                                  opened.text_files, eos_token_ids=opened.eos_token_ids)
        np.save(tmp_path / f"gptq_{name}.npy", logits(opened.model, ids))
        for kind, root in (("hf", hf_dir), ("gptq", gptq_dir)):
            cases.append({"name": name, "kind": kind, "dir": str(root), "ids": ids,
                          "expected": str(tmp_path / f"{kind}_{name}.npy"), "chat": golden["chat_messages"],
                          "eos": opened.eos_token_ids})
    return cases, goldens


def eos_list(value) -> list[int]:
    return list(value) if isinstance(value, list) else [value]


def test_exports_load_in_transformers_with_the_toolkit_logits(tmp_path):
    python = peer_python()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        cases, goldens = build_exports(tmp_path)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps(cases))
    script = tmp_path / "peer_check.py"
    script.write_text(PEER_SCRIPT)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    run = subprocess.run([str(python), str(script), str(manifest)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    classes = {"llama31": "LlamaForCausalLM", "qwen2_tied": "Qwen2ForCausalLM", "qwen3_qknorm": "Qwen3ForCausalLM",
               "llama_gqa": "LlamaForCausalLM"}
    eos = {f"{c['kind']}:{c['name']}": c["eos"] for c in cases}
    for key, out in results.items():
        kind, name = key.split(":")
        print(f"{key}: {out['class']} via {out['how']}: max |logits - toolkit| = {out['max_abs']:.3g} "
              f"(max |logit| {out['scale']:.3g})")
        assert out["class"] == classes[name], key
        assert out["max_abs"] < 1e-4 * max(1.0, out["scale"]), key
        assert out["rope_type"] == ("llama3" if name == "llama31" else "default"), key
        assert out["chat_ids"] == goldens[name]["chat_input_ids"], key
        assert eos_list(out["eos"]) == eos[key] == ([636, 639] if name == "llama31" else eos[key]), key
    assert len(results) == 2 * len(FAMILIES)
