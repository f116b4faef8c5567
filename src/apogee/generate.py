"""Sample text from a run's latest checkpoint, in one process, whatever layout trained it.

DCP reshards on load: the sharded (DTensor) checkpoint of any layout loads into a plain model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from apogee.checkpoint.dcp import latest_checkpoint, safe_load
from apogee.config import load_config
from apogee.data.tokenizers import load_tokenizer
from apogee.models.llama import Transformer, rope_cos_sin


def load_model(run_dir: Path, device: torch.device) -> tuple[Transformer, object]:
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an apogee run directory (no config.toml); pass RUN_DIR of a training run")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint to sample from")
    cfg = load_config(config_path)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    from apogee.train.trainer import model_vocab  # local: the trainer pulls in the whole engine

    args = cfg.model.args().with_vocab(model_vocab(cfg, tokenizer.vocab_size))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    state = {"model": model.state_dict()}
    safe_load(state, checkpoint)  # allow-listed metadata, weights-only items
    model.load_state_dict(state["model"])
    # The rotary table is not persistent (not in checkpoints): compute it for the device.
    model.rope = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta, device=device)
    return model.eval(), tokenizer


@torch.no_grad()
def sample(
    model: Transformer, prompt_ids: list[int], *, tokens: int, temperature: float, top_k: int, seed: int
) -> list[int]:
    """Autoregressive sampling; the context is cropped to the model's window."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids or [0]], dtype=torch.long, device=device)
    window = model.args.max_seq_len
    for _ in range(tokens):
        logits = model(ids[:, -window:])[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt_ids or [0]) :].tolist()


def generate(run_dir: Path, prompt: str, *, tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
             seed: int = 0, device: str = "cpu") -> str:
    model, tokenizer = load_model(run_dir, torch.device(device))
    ids = tokenizer.encode(prompt) if prompt else []
    out = sample(model, ids, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed)
    return tokenizer.decode(out)
