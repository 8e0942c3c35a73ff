#!/usr/bin/env python
"""Reference outputs of the two remote-code families (Qwen-VL-Chat, InternLM-XComposer2-VL) at tiny size.

Standalone on purpose: it never imports pathinsight, and it runs both in the side venv with the
reference transformers (4.33.2, where the remote code runs unchanged; `bash .ci/run remote-ref-venv`)
and in the main environment (transformers 5, where the remote code needs run-time patches).

    # once, in the side venv: build tiny checkpoints, run them, write the fixtures
    python tools/remote_reference.py write --remote-dir ../shared/remote-code --out nbs/fixtures/remote
    # anywhere: rebuild the SAME checkpoint from a fixture (no model instantiated to find the keys),
    # run it in this environment (optionally after a setup file that applies run-time patches), write outputs
    python tools/remote_reference.py outputs --fixture nbs/fixtures/remote/ixc2.json --remote-dir ... --out B.json [--setup patches.py]
    # compare two output files
    python tools/remote_reference.py compare A.json B.json --atol 1e-5

The checkpoint's weights come from `deterministic_state`, a function of parameter names and shapes only
(not of any model's init), so they are bit-identical whatever transformers version writes them.
"""
from __future__ import annotations

import argparse, base64, contextlib, hashlib, importlib, inspect, json, math, os, platform, shutil, sys, tempfile
from pathlib import Path

FAMILIES = ("qwen-vl", "ixc2")
REMOTE_SUBDIR = {"qwen-vl": "qwen-vl-chat", "ixc2": "internlm-xcomposer2-vl"}
REMOTE_FILES = {  # copied as the hub would serve them next to the weights
    "qwen-vl": ["configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "tokenization_qwen.py",
                "visual.py", "qwen.tiktoken", "tokenizer_config.json"],
    "ixc2": ["build_mlp.py", "configuration_internlm_xcomposer2.py", "modeling_internlm2.py",
             "modeling_internlm_xcomposer2.py", "tokenization_internlm_xcomposer2.py", "tokenizer.model"],
}
# transformers caches remote code by the model folder's name: one name per family
MODEL_DIRNAME = {"qwen-vl": "pathinsight_ref_qwen_vl", "ixc2": "pathinsight_ref_ixc2"}
CLIP_DIRNAME = "openai/clip-vit-large-patch14-336"  # build_mlp.py loads CLIP by this literal name; a local folder wins offline
IMAGE_NAME = "pathinsight_ref_image.png"  # relative: Qwen-VL stores the path inside the prompt tokens
QUESTION = "What tissue type is shown in this patch?"
ANSWER = "Colorectal adenocarcinoma epithelium."
QWEN_SYSTEM = "You are a helpful assistant."  # Qwen-VL's chat() and finetune.py default
MAX_NEW_TOKENS = 12
N_TRACKED_IDS = 64
IXC2_IMAGE_STRIDE = 8  # logits at tracked ids: every text position, every 8th image position (+ the last)
SEED = 0

# The one change made to the COPY of IXC2's remote code (never to the shared originals): build_mlp.py
# hardcodes a 1024 -> 4096 projector (CLIP-L width -> InternLM2-7B hidden). The projector is sized from
# the vision tower's config and the LM config instead; with the real sizes it builds the same 1024 -> 4096
# module, and nothing else of the code path changes.
IXC2_CODE_CHANGES = [
    {"file": "build_mlp.py",
     "old": "def build_vision_projector():\n    projector_type = 'mlp2x_gelu'\n    mm_hidden_size = 1024\n    hidden_size = 4096\n",
     "new": "def build_vision_projector(mm_hidden_size=1024, hidden_size=4096):\n    projector_type = 'mlp2x_gelu'\n"},
    {"file": "modeling_internlm_xcomposer2.py",
     "old": "self.vision_proj = build_vision_projector()",
     "new": "self.vision_proj = build_vision_projector(self.vit.vision_tower.config.hidden_size, config.hidden_size)"},
]


# What the reference run does that a comparison run must do the same way (recorded in each fixture)
NOTES = {
    "qwen-vl": [
        "working folder: an empty SimSun.ttf (tokenization_qwen.py downloads the font at import otherwise) and the PNG; "
        "the prompt holds the image's RELATIVE name (Qwen-VL stores the path as bytes in its 256 image tokens and "
        "opens it during forward, relative to the working folder)",
        "float32 through the config (fp32 true; the hub config says fp16)",
        "generation_config.json = the hub one with do_sample false, top_p/top_k removed, max_new_tokens 12; "
        "chat(tokenizer, query, history=None) uses it; new_ids = what generate returned after the prompt ids",
        "logits: forward(input_ids) of make_context(...) from the model's own qwen_generation_utils (chat's prompt)",
        "loss: model.train() (every dropout is 0.0), labels as finetune.py preprocess(), 4 eod pads masked by "
        "attention_mask = ids != eod, use_cache False; grad_norm = L2 norm of all parameter gradients after backward",
    ],
    "ixc2": [
        "working folder: openai/clip-vit-large-patch14-336/ = tiny CLIPVisionConfig (336 px, patch 14) + weights, "
        "loaded by the constructor (build_mlp.py); resize_pos interpolates its 24x24 position table to 35x35 "
        "('Position interpolate' is printed); the checkpoint then overwrites every vit.* parameter",
        "the copied build_mlp.py/modeling_internlm_xcomposer2.py size the projector from the configs (remote_code_changes)",
        "no .cuda() on the paths used: chat() is given the image path (encode_img -> vis_processor -> .to(self.device)); "
        "chat(image=None) and the text-only training forward call .cuda() and are not used",
        "logits: forward(inputs_embeds, im_mask) built by the model's encode_img + interleav_wrap_chat with chat()'s "
        "default meta_instruction (what chat feeds generate)",
        "chat: do_sample False, max_new_tokens 12, other chat() defaults (repetition_penalty 1.005 applies); "
        "transformers 4.33 generates from inputs_embeds with input_ids = [[bos]] and returns that bos first: "
        "generate_prefix 1, new_ids exclude it",
        "loss: model.eval() (PLoRA's lora_dropout 0.05 would draw random masks), samples = {'text_input': [[conv]], "
        "'data_type': ['multi'], 'image': [vis_processor(image)[None]]}, conv as finetune's conv2text; 4.33's tokenizer "
        "drops the newline before </s> (label ids end 92542, 2)",
        "config model_type is the hub's internlmxcomposer2, the config class says internlm: 4.33 warns, harmless",
    ],
}


# ----------------------------------------------------------------------------------------------- configs
def tiny_config(family: str) -> dict:
    "config.json of a tiny model of `family`: the real vocabulary and code path, small widths and depths."
    if family == "qwen-vl":
        return {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0,
            "bf16": False, "fp16": False, "fp32": True,  # float32 on CPU (the real config: fp16)
            "hidden_size": 128,  # the Resampler has output_dim // 128 heads: 128 is the smallest LM width
            "initializer_range": 0.02,
            "intermediate_size": 512,  # QWenMLP uses intermediate_size // 2 = 256
            "kv_channels": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
            "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
            "seq_length": 2048, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
            "torch_dtype": "float32", "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": "auto",
            "use_logn_attn": True,
            # n_queries stays the code's default 256 (image tokens per image); the 256x`width` positional
            # table is interpolated to the 4x4 grid of a 56 px image, as 448 px interpolates it to 32x32
            "visual": {"heads": 2, "image_size": 56, "image_start_id": 151857, "layers": 2, "mlp_ratio": 4.9231,
                       "output_dim": 128, "patch_size": 14, "width": 64},
            "vocab_size": 151936,  # the real (padded) size: 151,643 BPE + 208 specials + 9 image/box tags = 151,860 used
        }
    if family == "ixc2":
        return {
            "architectures": ["InternLMXComposer2ForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
                         "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"},
            "attn_implementation": "eager", "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
            "max_length": 4096, "max_position_embeddings": 32768, "model_type": "internlmxcomposer2",
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,  # GQA as the real 32/8
            "rms_norm_eps": 1e-5, "rope_scaling": {"type": "dynamic", "factor": 1.0}, "rope_theta": 1000000,
            "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": False,
            "vocab_size": 92544, "img_size": 490,
        }
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def tiny_clip_config() -> dict:
    """config.json of the tiny CLIP vision tower IXC2 builds in its constructor (folder CLIP_DIRNAME in the
    working directory). 336 px / patch 14 as the real CLIP-L-336, so build_mlp's resize_pos interpolates
    the 24x24 position table to 35x35 exactly as with the real one; images are 490 px."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_channels": 3,
            "image_size": 336, "patch_size": 14, "projection_dim": 32, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02,
            "initializer_factor": 1.0, "torch_dtype": "float32"}


# ----------------------------------------------------------------------------------------------- weights
def _is_norm_weight(name: str, shape) -> bool:
    last = name.split(".")[-2].lower() if "." in name else ""
    return len(shape) == 1 and name.endswith(".weight") and ("norm" in last or last.startswith("ln"))


def deterministic_state(keys_shapes: dict, seed: int = SEED) -> dict:
    """{name: float32 tensor} for {name: shape}, each drawn from its own torch.Generator seeded with the first
    8 bytes (little endian, masked to 63 bits) of sha256(f"{seed}:{name}"); independent of any model's init.
      * norm weights (1-D `*.weight` of a module named *norm* or ln*): 1 + 0.1 * N(0, 1)
      * other 1-D tensors (biases): 0.02 * N(0, 1)
      * >= 2-D tensors (matrices, embeddings, conv kernels, position tables, queries): N(0, 1) / sqrt(fan_in),
        fan_in = prod(shape[1:]), so activations stay O(1) and attention is far from uniform (a flat
        0.02 would make every attention map near-uniform and hide rotary/position errors)."""
    import torch
    out = {}
    for name, shape in keys_shapes.items():
        shape = tuple(int(s) for s in shape)
        s = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
        g = torch.Generator().manual_seed(s)
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if _is_norm_weight(name, shape): x = 1 + 0.1 * x
        elif len(shape) <= 1: x = 0.02 * x
        else: x = x / math.sqrt(math.prod(shape[1:]))
        out[name] = x.contiguous()
    return out


def keys_shapes_of(model) -> dict:
    "The checkpoint's tensors: the model's parameters (buffers such as rotary tables and position ids are not saved)."
    return {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=True)}


# ----------------------------------------------------------------------------------------------- folders
def _sha(p: Path) -> str: return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def synthetic_image():
    "A 112x112 RGB uint8 array: H&E-like pink/purple quadrants, diagonal stripes, a radial blob, a gradient."
    import numpy as np
    n = 112
    y, x = np.mgrid[0:n, 0:n]
    img = np.zeros((n, n, 3), np.float64)
    img[:] = (236, 170, 200)  # eosin pink
    q = (y < n // 2) ^ (x < n // 2)
    img[q] = (120, 60, 160)  # haematoxylin purple
    stripes = ((x + y) // 7) % 3 == 0
    img[stripes] = img[stripes] * 0.6 + np.array([250, 250, 250]) * 0.4
    r = np.hypot(y - 70, x - 40)
    img[r < 18] = (60, 20, 110)  # a "nucleus"
    img[..., 1] += 40 * x / n  # a gradient so no two columns agree
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def prepare_workdir(workdir) -> Path:
    """The working folder the remote code must run in: an empty SimSun.ttf (Qwen's tokenizer module downloads
    the font at import otherwise) and the synthetic PNG; IXC2's CLIP folder is written by write_checkpoint."""
    from PIL import Image
    workdir = Path(workdir); workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "SimSun.ttf").touch()
    Image.fromarray(synthetic_image()).save(workdir / IMAGE_NAME)
    return workdir


@contextlib.contextmanager
def inside(workdir):
    old = os.getcwd(); os.chdir(workdir)
    try: yield Path(workdir)
    finally: os.chdir(old)


def _save(state: dict, path: Path):
    from safetensors.torch import save_file
    save_file(state, str(path), metadata={"format": "pt"})


def write_clip_folder(workdir, clip_keys_shapes: dict | None = None) -> dict:
    "Tiny CLIP folder CLIP_DIRNAME under workdir; returns its keys+shapes (from the reference model if not given)."
    d = Path(workdir) / CLIP_DIRNAME; d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(tiny_clip_config(), indent=2) + "\n")
    if clip_keys_shapes is None:
        from transformers import CLIPVisionConfig, CLIPVisionModel
        clip_keys_shapes = keys_shapes_of(CLIPVisionModel(CLIPVisionConfig(**tiny_clip_config())))
    _save(deterministic_state(clip_keys_shapes), d / "model.safetensors")
    return clip_keys_shapes


def write_checkpoint(family: str, remote_dir, out_dir, keys_shapes: dict | None = None,
                     clip_keys_shapes: dict | None = None) -> dict:
    """A model folder as the hub would have it, in out_dir: the remote .py and tokenizer files copied from
    remote_dir/<family folder> (IXC2: with IXC2_CODE_CHANGES applied to the copy), config.json, tokenizer and
    generation configs, and model.safetensors = deterministic_state(keys_shapes). Without keys_shapes the model
    is instantiated here (the reference version) to list them. IXC2 also needs the tiny CLIP folder in the
    working directory: it is written to out_dir's parent, which must be the working directory when loading.
    Returns {"keys_shapes", "clip_keys_shapes", "files": {name: sha256}}."""
    src = Path(remote_dir) / REMOTE_SUBDIR[family]
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
    for f in REMOTE_FILES[family]: shutil.copyfile(src / f, out / f)
    if family == "ixc2":
        for ch in IXC2_CODE_CHANGES:
            p = out / ch["file"]; text = p.read_text()
            if text.count(ch["old"]) != 1: raise RuntimeError(f"{p}: expected the projector code exactly once")
            p.write_text(text.replace(ch["old"], ch["new"]))
        (out / "tokenizer_config.json").write_text(json.dumps({
            "auto_map": {"AutoTokenizer": ["tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer", None]},
            "tokenizer_class": "InternLMXComposer2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "padding_side": "right"}, indent=2) + "\n")
        clip_keys_shapes = write_clip_folder(out.parent, clip_keys_shapes)
    else:
        gen = json.loads((src / "generation_config.json").read_text())
        for k in ("top_p", "top_k"): gen.pop(k, None)
        gen.update(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)  # greedy
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(tiny_config(family), indent=2) + "\n")
    if keys_shapes is None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        with inside(out.parent):
            cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, torch_dtype=torch.float32)
        keys_shapes = keys_shapes_of(model); del model
    _save(deterministic_state(keys_shapes), out / "model.safetensors")
    files = {f.name: _sha(f) for f in sorted(out.iterdir()) if f.is_file()}
    clip = out.parent / CLIP_DIRNAME
    clip_files = {f.name: _sha(f) for f in sorted(clip.iterdir())} if family == "ixc2" else None
    return {"keys_shapes": keys_shapes, "clip_keys_shapes": clip_keys_shapes, "files": files, "clip_files": clip_files}


def load(family: str, model_dir):
    "from_pretrained(model_dir, trust_remote_code=True), float32, eval mode; call inside the working directory."
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, torch_dtype=torch.float32)
    model.eval()
    if family == "ixc2": model.tokenizer = tok
    return model, tok


def weights_check(model, model_dir) -> dict:
    """Whether the loaded parameters are the checkpoint's, bit for bit (a silent re-initialisation on load shows
    here): keys missing from the model, keys the model has that the checkpoint lacks, tensors that differ."""
    from safetensors.torch import load_file
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    params = dict(model.named_parameters())
    differ = sorted(k for k in sd if k in params and not bool((params[k].detach().float() == sd[k]).all()))
    return {"not_in_model": sorted(set(sd) - set(params)), "not_in_checkpoint": sorted(set(params) - set(sd)),
            "differ": differ, "exact": not differ and set(sd) == set(params)}


# ----------------------------------------------------------------------------------------------- outputs
def _b64(t) -> dict:
    import numpy as np
    a = np.ascontiguousarray(t.detach().cpu().numpy().astype("<f4"))
    return {"shape": list(a.shape), "f32le_b64": base64.b64encode(a.tobytes()).decode()}


def _unb64(d):
    import numpy as np
    return np.frombuffer(base64.b64decode(d["f32le_b64"]), "<f4").reshape(d["shape"])


def tracked_ids(family: str, answer_ids) -> list:
    "N_TRACKED_IDS vocabulary ids: the family's specials, the answer's tokens, then seeded random ids."
    import numpy as np
    cfg = tiny_config(family)
    special = [151643, 151644, 151645, 151857, 151858, 151859] if family == "qwen-vl" else [0, 1, 2, 92542, 92543]
    ids = list(dict.fromkeys(special + [int(i) for i in answer_ids]))[:N_TRACKED_IDS]
    rng = np.random.default_rng(1234)
    for i in rng.permutation(cfg["vocab_size"]):
        if len(ids) >= N_TRACKED_IDS: break
        if int(i) not in ids: ids.append(int(i))
    return ids


def summarize_logits(logits, ids, positions) -> dict:
    "logits (L, V): per-position logsumexp and argmax (all positions), logits at `ids` at `positions`."
    import torch
    logits = logits.float()
    return {"length": int(logits.shape[0]), "logsumexp": _b64(torch.logsumexp(logits, -1)),
            "argmax": logits.argmax(-1).tolist(), "positions": list(positions), "ids": list(ids),
            "at_ids": _b64(logits[list(positions)][:, list(ids)])}


def _grad_norm(model) -> float:
    import torch
    sq = [p.grad.detach().double().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


@contextlib.contextmanager
def _capture_generate(model, store: dict):
    "Record what model.generate returns while chat() runs (chat itself returns only text)."
    orig = model.generate
    def gen(*a, **k):
        out = orig(*a, **k); store["generate_output"] = out[0].tolist(); return out
    model.generate = gen
    try: yield
    finally: del model.generate


def _qwen_outputs(model, tok) -> dict:
    import torch
    gu = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".qwen_generation_utils")
    query = tok.from_list_format([{"image": IMAGE_NAME}, {"text": QUESTION}])
    raw, ctx = gu.make_context(tok, query, history=[], system=QWEN_SYSTEM,
                               max_window_size=model.generation_config.max_window_size, chat_format="chatml")
    ids = torch.tensor([ctx])
    with torch.no_grad(): logits = model(input_ids=ids).logits[0]
    ans_ids = tok.encode(ANSWER)
    res = {"prompt_text": raw, "prompt_ids": ctx,
           "logits": summarize_logits(logits, tracked_ids("qwen-vl", ans_ids), range(len(ctx)))}
    # (b) training forward, labels as Qwen-VL's finetune.py preprocess(): -100 on system and user turns and on the
    # role tokens; the batch is padded with eod (4 pads here, as finetune pads to model_max_length)
    im_start, im_end, nl = tok.im_start_id, tok.im_end_id, tok("\n").input_ids
    system = [im_start] + tok("system").input_ids + nl + tok(QWEN_SYSTEM).input_ids + [im_end] + nl
    inp, lab = list(system), [im_start] + [-100] * (len(system) - 3) + [im_end] + nl
    for role, value in (("user", query), ("assistant", ANSWER)):
        r = tok(f"<|im_start|>{role}").input_ids
        part = r + nl + tok(value).input_ids + [im_end] + nl
        inp += part
        lab += ([im_start] + [-100] * (len(part) - 3) + [im_end] + nl if role == "user" else
                [im_start] + [-100] * len(r) + part[len(r) + 1:-2] + [im_end] + nl)
    pad = tok.eod_id
    inp += [pad] * 4; lab += [-100] * 4
    x, y = torch.tensor([inp]), torch.tensor([lab])
    model.train(); model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=y, attention_mask=x.ne(pad), use_cache=False)
    out.loss.backward()
    res["train"] = {"mode": "train() (Qwen-VL's dropouts are 0.0)", "input_ids": inp, "labels": lab,
                    "loss": out.loss.item(), "grad_norm": _grad_norm(model)}
    model.zero_grad(set_to_none=True); model.eval()
    # (c) greedy chat: generation_config.json of the checkpoint has do_sample false, max_new_tokens 12
    store = {}
    with _capture_generate(model, store): text, _ = model.chat(tok, query, history=None)
    res["chat"] = {"query": query, "history": None, "text": text,
                   "new_ids": store["generate_output"][len(ctx):],
                   "settings": {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS, "system": QWEN_SYSTEM}}
    return res


def _ixc2_outputs(model, tok) -> dict:
    import torch
    from PIL import Image
    query = "<ImageHere>" + QUESTION
    meta = inspect.signature(model.chat).parameters["meta_instruction"].default  # chat()'s own default
    # (a) the chat prompt's forward, built with the model's own encode_img + interleav_wrap_chat (as chat() does)
    with torch.no_grad():
        img = model.encode_img(IMAGE_NAME)
        inputs, im_mask = model.interleav_wrap_chat(tok, query, img, [], meta)
        logits = model(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask).logits[0]
    m = im_mask[0].tolist()
    img_pos = [i for i, b in enumerate(m) if b]
    positions = [i for i, b in enumerate(m) if not b or (i - img_pos[0]) % IXC2_IMAGE_STRIDE == 0 or i == img_pos[-1]]
    ans_ids = tok(ANSWER, add_special_tokens=False).input_ids
    res = {"prompt_text_parts": [p for p in (
               (f"[UNUSED_TOKEN_146]system\n{meta}[UNUSED_TOKEN_145]\n" if meta else "")
               + f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n").split("<ImageHere>")],
           "image_positions": [img_pos[0], img_pos[-1]], "im_mask_sum": int(sum(m)),
           "logits": summarize_logits(logits, tracked_ids("ixc2", ans_ids), positions)}
    # (b) training forward: finetune's conv2text format, labels built inside the model (mask_human_targets)
    conv = (f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n"
            f"[UNUSED_TOKEN_146]assistant\n{ANSWER}[UNUSED_TOKEN_145]\n</s>")
    image = model.vis_processor(Image.open(IMAGE_NAME).convert("RGB")).unsqueeze(0)  # (1, 3, 490, 490)
    with torch.no_grad():
        _, _, targets, _ = model.interleav_wrap([image], [[conv]])
    kept = [(i, int(t)) for i, t in enumerate(targets[0].tolist()) if t != -100]
    model.eval(); model.zero_grad(set_to_none=True)  # eval: PLoRA's lora_dropout (0.05) would draw random masks
    out = model(samples={"text_input": [[conv]], "data_type": ["multi"], "image": [image]})
    out.loss.backward()
    res["train"] = {"mode": "eval() (PLoRA lora_dropout 0.05 off)", "conv": conv, "label_positions": [k[0] for k in kept],
                    "label_ids": [k[1] for k in kept], "n_targets": int(targets.shape[1]),
                    "loss": out.loss.item(), "grad_norm": _grad_norm(model)}
    model.zero_grad(set_to_none=True)
    # (c) greedy chat with the image path (chat(image=None) would call .cuda())
    store = {}
    with _capture_generate(model, store):
        text, _ = model.chat(tok, query, image=IMAGE_NAME, history=[], do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    # transformers 4.33 starts generation from inputs_embeds with input_ids = [[bos]] and returns that bos first;
    # versions that start from an empty input_ids do not: the prefix is what precedes the generated tokens
    out, eos = store["generate_output"], {tok.eos_token_id, 92542}
    prefix = len(out) - MAX_NEW_TOKENS if out[-1] not in eos else int(out[0] == tok.bos_token_id)
    res["chat"] = {"query": query, "text": text, "generate_output": out, "generate_prefix": prefix, "new_ids": out[prefix:],
                   "settings": {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS,
                                "other": "chat() defaults: temperature 1.0, top_p 0.8, repetition_penalty 1.005, meta_instruction default"}}
    return res


def reference_outputs(family: str, model, tokenizer, workdir) -> dict:
    """Outputs of `model` on the fixed inputs, run inside workdir (which holds IMAGE_NAME, SimSun.ttf and, for
    IXC2, the CLIP folder): (a) a logits summary of the forward on the chat prompt with the image, (b) loss and
    gradient norm of a training forward with labels, (c) greedy chat() token ids and text. float32, CPU, one thread."""
    import torch
    torch.manual_seed(SEED)
    with inside(workdir):
        return _qwen_outputs(model, tokenizer) if family == "qwen-vl" else _ixc2_outputs(model, tokenizer)


def _versions() -> dict:
    import numpy, torch, transformers
    v = {"python": platform.python_version(), "transformers": transformers.__version__, "torch": torch.__version__,
         "numpy": numpy.__version__}
    for m in ("tokenizers", "safetensors", "PIL", "tiktoken", "sentencepiece", "torchvision", "einops"):
        with contextlib.suppress(Exception): v[m] = importlib.import_module(m).__version__
    return v


def _env_setup(workdir: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["HF_MODULES_CACHE"] = str(workdir / "hf_modules")  # remote code cached per run, never stale
    import torch
    torch.set_num_threads(1); torch.manual_seed(SEED)


def _input_record(workdir: Path) -> dict:
    return {"image": IMAGE_NAME, "image_size": [112, 112], "image_png_sha256": _sha(workdir / IMAGE_NAME),
            "image_pixels_sha256": hashlib.sha256(synthetic_image().tobytes()).hexdigest(),
            "question": QUESTION, "answer": ANSWER, "max_new_tokens": MAX_NEW_TOKENS, "seed": SEED,
            "torch_threads": 1, "dtype": "float32", "device": "cpu"}


def run_family(family: str, remote_dir, workdir, keys: dict | None = None, repeat: int = 1) -> dict:
    """Write the checkpoint into workdir (keys from the fixture `keys` when given, else from the model here), load
    it `repeat` times and compute outputs each time; returns the record (outputs of the first load, `repeat_equal`)."""
    workdir = prepare_workdir(workdir)
    model_dir = workdir / MODEL_DIRNAME[family]
    ck = write_checkpoint(family, remote_dir, model_dir, keys and keys["keys_shapes"], keys and keys.get("clip_keys_shapes"))
    runs = []
    for _ in range(repeat):
        with inside(workdir): model, tok = load(family, model_dir)
        wc = weights_check(model, model_dir)
        runs.append(reference_outputs(family, model, tok, workdir)); del model
    rec = {"family": family, "versions": _versions(), "notes": NOTES[family], "tiny_config": tiny_config(family),
           "tiny_clip_config": tiny_clip_config() if family == "ixc2" else None,
           "remote_code_changes": IXC2_CODE_CHANGES if family == "ixc2" else [],
           "checkpoint_files_sha256": ck["files"], "clip_folder": CLIP_DIRNAME if family == "ixc2" else None,
           "clip_files_sha256": ck["clip_files"], "n_params": sum(math.prod(s) for s in ck["keys_shapes"].values()),
           "keys_shapes": ck["keys_shapes"], "clip_keys_shapes": ck["clip_keys_shapes"],
           "weights": "deterministic_state(keys_shapes, seed=0) (tools/remote_reference.py)",
           "weights_after_load": wc, "inputs": _input_record(workdir), "outputs": runs[0]}
    if repeat > 1: rec["repeat_equal"] = all(json.dumps(r, sort_keys=True) == json.dumps(runs[0], sort_keys=True) for r in runs)
    return rec


# ----------------------------------------------------------------------------------------------- compare
def compare(a: dict, b: dict, atol: float = 1e-5) -> dict:
    "Differences between two records (fixture or outputs file): logits, argmax, loss, grad norm, greedy tokens, text."
    import numpy as np
    oa, ob = a["outputs"], b["outputs"]
    la, lb = oa["logits"], ob["logits"]
    r = {"family": a.get("family"), "versions": [a.get("versions", {}).get("transformers"), b.get("versions", {}).get("transformers")]}
    same_shape = la["length"] == lb["length"] and la["positions"] == lb["positions"] and la["ids"] == lb["ids"]
    r["logits_same_layout"] = same_shape
    if same_shape:
        d1 = np.abs(_unb64(la["logsumexp"]).astype(np.float64) - _unb64(lb["logsumexp"]))
        d2 = np.abs(_unb64(la["at_ids"]).astype(np.float64) - _unb64(lb["at_ids"]))
        r["logits_max_abs_diff"] = float(max(d1.max(), d2.max()))
        r["argmax_mismatches"] = int(sum(x != y for x, y in zip(la["argmax"], lb["argmax"])))
    for k in ("prompt_ids", "prompt_text", "prompt_text_parts", "image_positions"):
        if k in oa or k in ob: r[f"{k}_equal"] = oa.get(k) == ob.get(k)
    ta, tb = oa["train"], ob["train"]
    r["loss"] = [ta["loss"], tb["loss"]]; r["loss_abs_diff"] = abs(ta["loss"] - tb["loss"])
    r["grad_norm_rel_diff"] = abs(ta["grad_norm"] - tb["grad_norm"]) / max(abs(ta["grad_norm"]), 1e-12)
    for k in ("labels", "input_ids", "label_ids", "label_positions"):
        if k in ta: r[f"train_{k}_equal"] = ta[k] == tb.get(k)
    r["greedy_ids_equal"] = oa["chat"]["new_ids"] == ob["chat"]["new_ids"]
    r["chat_text_equal"] = oa["chat"]["text"] == ob["chat"]["text"]
    for name, rec in (("a", a), ("b", b)):  # parameters after from_pretrained == checkpoint (no silent re-init)
        if "weights_after_load" in rec: r[f"weights_loaded_exactly_{name}"] = rec["weights_after_load"]["exact"]
    r["ok"] = bool(same_shape and r["logits_max_abs_diff"] <= atol and r["argmax_mismatches"] == 0
                   and r["loss_abs_diff"] <= atol and r["grad_norm_rel_diff"] <= max(atol, 1e-4)
                   and r["greedy_ids_equal"] and r["chat_text_equal"]
                   and all(v for k, v in r.items() if k.endswith("_equal") or k.startswith("weights_loaded_exactly")))
    return r


# ----------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="build the tiny checkpoints, run them (twice: determinism), write fixtures")
    w.add_argument("--remote-dir", required=True); w.add_argument("--out", required=True)
    w.add_argument("--family", choices=FAMILIES, action="append"); w.add_argument("--workdir")
    o = sub.add_parser("outputs", help="rebuild a fixture's checkpoint (recorded keys, nothing instantiated), run it here")
    o.add_argument("--fixture", required=True); o.add_argument("--remote-dir", required=True)
    o.add_argument("--out", required=True); o.add_argument("--workdir")
    o.add_argument("--setup", help="a Python file run first (e.g. one that applies run-time patches)")
    c = sub.add_parser("compare", help="compare two records"); c.add_argument("a"); c.add_argument("b")
    c.add_argument("--atol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    if args.cmd == "compare":
        r = compare(json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text()), args.atol)
        print(json.dumps(r, indent=2)); return 0 if r["ok"] else 1
    base = Path(args.workdir or tempfile.mkdtemp(prefix="pathinsight-remote-ref-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    _env_setup(base)
    try: return _run(args, base)
    finally:
        if not args.workdir: shutil.rmtree(base, ignore_errors=True)  # the checkpoints (~200 MB) go; --workdir keeps them


def _run(args, base: Path) -> int:
    if args.cmd == "write":
        out = Path(args.out); out.mkdir(parents=True, exist_ok=True); bad = 0
        for fam in args.family or FAMILIES:
            rec = run_family(fam, Path(args.remote_dir).resolve(), base / fam, repeat=2)
            p = out / f"{fam}.json"; p.write_text(json.dumps(rec, indent=1) + "\n")
            o_ = rec["outputs"]
            print(f"{fam}: {p} ({p.stat().st_size / 1024:.0f} KB), {rec['n_params'] / 1e6:.1f}M params, loss "
                  f"{o_['train']['loss']:.6f}, chat {o_['chat']['text']!r}, same outputs on a second load: {rec['repeat_equal']}")
            bad += not (rec["repeat_equal"] and rec["weights_after_load"]["exact"])
        return 1 if bad else 0
    if args.setup:
        import runpy; runpy.run_path(args.setup, run_name="__remote_reference_setup__")
    fx = json.loads(Path(args.fixture).read_text())
    rec = run_family(fx["family"], Path(args.remote_dir).resolve(), base / fx["family"], keys=fx)
    for key in ("checkpoint_files_sha256", "clip_files_sha256"):
        a, b = rec.get(key) or {}, fx.get(key) or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff: print(f"warning: {key}: files differ from the fixture's: {diff}", file=sys.stderr)
    Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    r = compare(fx, rec); print(json.dumps(r, indent=2))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
