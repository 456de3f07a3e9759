"""Contrastive representation distillation (CRD; Tian et al., ICLR 2020).

Both sides' pooled embeddings go through a linear head to `feat_dim` dims and are L2-normalised. A memory
bank per side holds one momentum-averaged embedding per training image. For each sample, K negatives are
drawn uniformly from the images of *other* classes (the paper's "exact" mode), on the training device.
With P_n = 1/N and the NCE normalisation h = exp(v·m/τ)/Z (Z fixed from the first batch):

    L = -E[log h_pos/(h_pos + K·P_n)] - K·E[log K·P_n/(h_neg + K·P_n)]       (eq. 18-19 of the paper)

summed over the two directions (student vs teacher memory, teacher vs student memory). Scores are computed
as one (B, D) x (D, N) product followed by a gather, instead of gathering a (B, K+1, D) block of memory.

Virtual anchors: r_T is the teacher's pooled embedding; an anchor term's student-side direction contrasts
the student embedding with the anchor's embedding as the positive (through `embed_t`, detached) and the
teacher memory as negatives; its teacher-side direction is the FP32 term's own, shared. So with weights
w (FP32) + w_b (anchor) = QKD's weight, the split is exact: `embed_t` and both memories receive exactly
QKD's gradient and updates (only the FP32 teacher trains the teacher head), and the student's gradient is
QKD's student-side weight divided between the FP32 positive and the anchor positive.

Precision: the heads, the scores and the NCE terms run in fp32 even under bf16 autocast: h_neg (~1e-5)
vanishes against K·P_n (~0.3) in bf16, and the negative term read 0.012 instead of 1.004 per sample.

Example term: `{kind = "crd", weight = 0.8, feat_dim = 128, nce_k = 16384, nce_t = 0.07}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vaqkd import dist
from vaqkd.distill.params import BuildContext, Param


class CRDLoss(nn.Module):
    """CRD (Tian et al. 2020, eq. 18-19; see the module docstring): NCE over memory banks of both sides.

    Example term: `{kind = "crd", weight = 0.8, feat_dim = 128, nce_k = 16384, nce_t = 0.07}`.
    """

    kind = "crd"
    params: Mapping[str, Param] = {
        "feat_dim": Param(128, lo=1, hi=65536, doc="embedding size of both heads"),
        "nce_k": Param(16384, lo=1, hi=1 << 20, doc="negatives per sample"),
        "nce_t": Param(0.07, lo=0, lo_open=True, doc="temperature of the scores"),
        "nce_momentum": Param(0.5, lo=0, hi=1, hi_open=True, doc="momentum of the memory banks"),
    }
    uses_teacher = True
    heads: tuple[str, ...] = ("embed_s", "embed_t")

    @staticmethod
    def stages(p: Mapping, teacher: bool = False) -> tuple[str, ...]:
        return ("embedding",)

    @classmethod
    def build(cls, p: Mapping, ctx: BuildContext) -> CRDLoss:
        return cls(ctx.s_channels["embedding"], ctx.t_channels["embedding"], ctx.train_labels, p["feat_dim"],
                   p["nce_k"], p["nce_t"], p["nce_momentum"], ctx.seed)  # fmt: skip

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        labels: torch.Tensor,  # (N,) training labels, in dataset-index order
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        n = len(labels)
        self.k, self.t, self.momentum, self.seed, self.n = nce_k, nce_t, momentum, seed, n
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("memory_s", F.normalize(torch.rand(n, feat_dim, generator=g) * 2 * stdv - stdv, dim=1))
        self.register_buffer("memory_t", F.normalize(torch.rand(n, feat_dim, generator=g) * 2 * stdv - stdv, dim=1))
        self.register_buffer("z", torch.tensor([-1.0, -1.0]))  # NCE normalisers (student side, teacher side)
        self._z_pending = True  # until the first batch of this process has set (or, resumed, kept) z
        # Sampling negatives from other classes: sort indices by class; a class c occupies
        # order[start[c]:start[c]+count[c]]; draw u in [0, N - count[c]) and skip over the block.
        labels = labels.long()
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("count", counts, persistent=False)

    def target(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["embedding"]

    def sample_negatives(self, index: torch.Tensor, step: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """(B, K) dataset indices, each from a class other than that of `index`'s sample. `shard` = (p, P): the
        samples are shard p of a batch of P·B; the draws are made for the whole batch and shard p's rows kept,
        so ranks and micro-batches get the negatives one process would."""
        g = torch.Generator(device=index.device).manual_seed(hash((self.seed, step)) & 0x7FFF_FFFF_FFFF_FFFF)
        y = self.labels[index]
        size, start = (self.n - self.count[y]).unsqueeze(1), self.start[y].unsqueeze(1)
        p, shards, b = *shard, len(index)
        u = torch.rand(b * shards, self.k, generator=g, device=index.device)[p * b : (p + 1) * b]
        u = (u * size).long()
        u = torch.where(u >= start, u + self.count[y].unsqueeze(1), u)
        return self.order[u]

    def _h(self, scores: torch.Tensor, side: int) -> torch.Tensor:
        """Normalised scores h = exp(v·m/τ)/Z (Z is fixed by the first batch, see forward)."""
        return scores / self.z[side]

    def _nce_pos(self, s_pos: torch.Tensor, side: int) -> torch.Tensor:
        """Σ log h_pos/(h_pos + K·P_n) over the batch. s_pos: (B, 1)."""
        h = self._h(s_pos, side)
        return torch.log(h / (h + self.k / self.n + 1e-7)).sum()

    def _nce_neg(self, s_neg: torch.Tensor, side: int) -> torch.Tensor:
        """Σ log K·P_n/(h_neg + K·P_n) over the batch and the K negatives. s_neg: (B, K)."""
        kpn = self.k / self.n
        return torch.log(kpn / (self._h(s_neg, side) + kpn + 1e-7)).sum()

    def _pos(self, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.exp((v * pos).sum(1, keepdim=True) / self.t)  # (B, 1)

    def _neg(self, v: torch.Tensor, memory: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        # one (B, D) x (D, N) product, then a gather: cheaper than gathering a (B, K, D) block of memory
        return torch.exp((v @ memory.t()).gather(1, neg) / self.t)  # (B, K)

    def forward(
        self, s: dict[str, torch.Tensor], r: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
        step: int = 0, anchor: bool = False, cache: dict | None = None, shard: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:  # fmt: skip
        cache = {} if cache is None else cache  # this term's per-step state, shared with its anchors
        with torch.autocast(r.device.type, enabled=False):  # fp32 scores: see the module docstring
            if anchor:  # only the student-side positive changes; negatives, memories, Z and teacher side shared
                with torch.no_grad():
                    v_a = F.normalize(self.embed_t(r.float()), dim=1)
                v_s, neg_term, teacher_side = cache["v_s"], cache["neg_term"], cache["teacher_side"]
                return -(self._nce_pos(self._pos(v_s, v_a), 0) + neg_term) / len(v_s) + teacher_side
            return self._fp32_term(s, r, index, step, cache, shard)

    def _fp32_term(self, s, r, index, step, cache, shard=(0, 1)) -> torch.Tensor:
        v_t = F.normalize(self.embed_t(r.float()), dim=1)
        v_s = F.normalize(self.embed_s(s["embedding"].float()), dim=1)
        b = len(v_s)
        neg = self.sample_negatives(index, step, shard)
        s_pos, s_neg = self._pos(v_s, self.memory_t[index]), self._neg(v_s, self.memory_t, neg)
        s_pos_t, s_neg_t = self._pos(v_t, self.memory_s[index]), self._neg(v_t, self.memory_s, neg)
        if self._z_pending:  # Z from the first batch, positives and negatives together (reference behaviour)
            count = b * (s_neg.shape[1] + 1)
            z_new = torch.stack([s_pos.sum() + s_neg.sum(), s_pos_t.sum() + s_neg_t.sum()]).detach() / count
            if dist.active():  # every rank the same Z: the mean of the ranks' estimates
                z_new = dist.all_sum(z_new) / dist.world()
            # on the device, no host sync; a z loaded from a checkpoint (resume) is kept
            self.z.copy_(torch.where(self.z < 0, z_new * self.n, self.z))
            self._z_pending = False
        neg_term = self._nce_neg(s_neg, 0)
        teacher_side = -(self._nce_pos(s_pos_t, 1) + self._nce_neg(s_neg_t, 1)) / b
        cache.update(v_s=v_s, neg_term=neg_term, teacher_side=teacher_side)
        loss = -(self._nce_pos(s_pos, 0) + neg_term) / b + teacher_side
        with torch.no_grad():  # out of place: this step's graph (and its anchor terms) still read the old bank
            if dist.active():  # every rank applies every rank's update: the banks stay identical
                index = dist.all_gather_cat(index)
                v_s, v_t = dist.all_gather_cat(v_s.detach()), dist.all_gather_cat(v_t.detach())
            m = self.momentum
            new_s = F.normalize(self.memory_s[index] * m + v_s.detach() * (1 - m), dim=1)
            new_t = F.normalize(self.memory_t[index] * m + v_t.detach() * (1 - m), dim=1)
            self.memory_s = self.memory_s.index_copy(0, index, new_s)
            self.memory_t = self.memory_t.index_copy(0, index, new_t)
        return loss
