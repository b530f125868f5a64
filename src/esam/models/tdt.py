"""Time-divided transformer: frame-to-frame query matching for MV-Online training.

The :class:`TimeDividedTransformer` takes the query features of two consecutive frames (or of
the current frame and a merge memory) together with each query's axis-aligned box and returns

* the current frame's queries updated with what they attended to in the previous frame, and
* a match matrix ``P_t`` of **logits** (previous x current) that :class:`CrossFrameCriterion`
  supervises and ``OnlineMerge`` may use as its similarity.

Shape vocabulary: V frames, Q queries (``Q_t`` in the previous frame, ``Q_u`` in the current
one), d feature dim, H attention heads.

Design (one layer, pre-norm, applied ``num_layers`` times; ``x`` are the current queries and
``m`` the previous ones, which stay fixed across layers)::

    msg = CrossAttn(LN(x), LN(m), bias = GeomBias(box_x, box_m))   # (Q_u, d)
    x   = GRUCell(input=msg, hidden=x)                            # gated update, no residual
    x   = x + SelfAttn(LN(x))
    x   = x + FFN(LN(x))

The GRU cell plays the role of the residual connection of the cross-attention block: its gates
decide, per query and channel, how much of the previous frame to take in. Pre-norm keeps the
residual stream un-normalised, so the output features live on the same scale as the inputs,
which is what the slot-aligned consistency term ``||q_t - q_{t+1}||^2`` compares.

Geometry. Each box ``(cx, cy, cz, dx, dy, dz)`` is encoded per query as
``[centre, sin(2^0 centre), ..., sin(2^(F-1) centre), size]`` of width
``geometry_dim = 6 + 3 F`` (the default 9 is the public fork's ``[centre, sin(centre), size]``).
The additive attention bias for the pair (current i, previous j) is an MLP over
``[enc_i, enc_j, centre_i - centre_j]`` with one output per head; the explicit centre offset
lets the MLP express "nearby boxes attend to each other" without having to learn a
subtraction. Its first linear layer is split as ``A enc_i + B enc_j + C (centre_i - centre_j)``
so it is evaluated per query and broadcast to pairs (``O(Q d_g h)`` instead of
``O(Q^2 d_g h)``); this is exactly a linear layer over the concatenation.

Attention over zero keys (an empty previous frame) yields a zero message: the softmax over an
empty axis is empty, the weighted sum is zero and the output projection has no bias (a bias on
the value projection provides the same offset whenever keys exist). The whole network is
equivariant to permutations of the current queries (no positional encoding, per-query GRU and
FFN), so permuting the current inputs permutes the updated features and the columns of the
match logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TDTOutput", "TimeDividedTransformer", "box_geometry_encoding"]


@dataclass
class TDTOutput:
    """Output of :meth:`TimeDividedTransformer.forward`.

    Attributes:
        features: ``(Q_u, d)`` updated current-frame query features.
        match_logits: ``(Q_t, Q_u)`` match logits between previous query i and current query j
            (logits, not probabilities; ``sigmoid`` gives ``P_t``).
    """

    features: Tensor
    match_logits: Tensor


def box_geometry_encoding(boxes: Tensor, num_frequencies: int = 1) -> Tensor:
    """Encode axis-aligned boxes per query.

    Args:
        boxes: ``(Q, 6)`` boxes ``(cx, cy, cz, dx, dy, dz)``.
        num_frequencies: F, the number of sine octaves applied to the centre.

    Returns:
        ``(Q, 6 + 3 F)`` ``[centre, sin(2^0 centre), ..., sin(2^(F-1) centre), size]``.
    """
    centre, size = boxes[:, :3], boxes[:, 3:]  # (Q, 3), (Q, 3)
    scales = 2.0 ** torch.arange(num_frequencies, dtype=boxes.dtype, device=boxes.device)  # (F,)
    sines = torch.sin(centre[:, None, :] * scales[:, None]).flatten(1)  # (Q, 3F)
    return torch.cat([centre, sines, size], dim=1)  # (Q, 6 + 3F)


class _PairwiseGeometryMLP(nn.Module):
    """MLP over ``[enc_i, enc_j, centre_i - centre_j]`` for every (row i, column j) pair."""

    def __init__(self, geometry_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.row_proj = nn.Linear(geometry_dim, hidden_dim)
        self.col_proj = nn.Linear(geometry_dim, hidden_dim, bias=False)
        self.offset_proj = nn.Linear(3, hidden_dim, bias=False)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, row_enc: Tensor, row_centre: Tensor, col_enc: Tensor, col_centre: Tensor) -> Tensor:
        """``row_enc (R, g)``, ``row_centre (R, 3)``, ``col_enc (C, g)``, ``col_centre (C, 3)``
        -> ``(R, C, out_dim)``."""
        # C (c_i - c_j) = C c_i - C c_j: the linear offset term splits into per-query parts.
        row = self.row_proj(row_enc) + self.offset_proj(row_centre)  # (R, h)
        col = self.col_proj(col_enc) - self.offset_proj(col_centre)  # (C, h)
        hidden = F.gelu(row[:, None, :] + col[None, :, :])  # (R, C, h)
        return self.out(hidden)  # (R, C, out_dim)


def _multi_head_attention(
    query: Tensor, key: Tensor, value: Tensor, num_heads: int, bias: Tensor | None, dropout: nn.Dropout
) -> Tensor:
    """Scaled dot-product attention with an optional additive per-head bias.

    ``query (Q_u, d)``, ``key/value (Q_t, d)``, ``bias (H, Q_u, Q_t)`` -> ``(Q_u, d)``; zero
    keys give a zero output.
    """
    num_q, d = query.shape
    head_dim = d // num_heads
    q = query.view(num_q, num_heads, head_dim).transpose(0, 1)  # (H, Q_u, d/H)
    k = key.view(key.shape[0], num_heads, head_dim).transpose(0, 1)  # (H, Q_t, d/H)
    v = value.view(value.shape[0], num_heads, head_dim).transpose(0, 1)  # (H, Q_t, d/H)
    scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)  # (H, Q_u, Q_t)
    if bias is not None:
        scores = scores + bias
    weights = dropout(torch.softmax(scores, dim=-1))  # (H, Q_u, Q_t)
    out = weights @ v  # (H, Q_u, d/H); all zeros when Q_t = 0
    return out.transpose(0, 1).reshape(num_q, d)  # (Q_u, d)


class _TDTLayer(nn.Module):
    """Geometry-biased cross-attention + GRU update + self-attention + FFN (pre-norm)."""

    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, geometry_dim: int, geometry_hidden: int, dropout: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_query = nn.LayerNorm(d_model)
        self.norm_memory = nn.LayerNorm(d_model)
        self.cross_q = nn.Linear(d_model, d_model)
        self.cross_k = nn.Linear(d_model, d_model)
        self.cross_v = nn.Linear(d_model, d_model)
        self.cross_out = nn.Linear(d_model, d_model, bias=False)  # no bias: zero keys -> zero message
        self.geometry_bias = _PairwiseGeometryMLP(geometry_dim, geometry_hidden, num_heads)
        self.gru = nn.GRUCell(d_model, d_model)

        self.norm_self = nn.LayerNorm(d_model)
        self.self_qkv = nn.Linear(d_model, 3 * d_model)
        self.self_out = nn.Linear(d_model, d_model)

        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        cur: Tensor,
        cur_enc: Tensor,
        cur_centre: Tensor,
        prev: Tensor,
        prev_enc: Tensor,
        prev_centre: Tensor,
    ) -> Tensor:
        """``cur (Q_u, d)``, ``prev (Q_t, d)`` plus their geometry -> updated ``cur (Q_u, d)``."""
        bias = self.geometry_bias(cur_enc, cur_centre, prev_enc, prev_centre)  # (Q_u, Q_t, H)
        x = self.norm_query(cur)  # (Q_u, d)
        m = self.norm_memory(prev)  # (Q_t, d)
        msg = _multi_head_attention(
            self.cross_q(x), self.cross_k(m), self.cross_v(m), self.num_heads, bias.permute(2, 0, 1), self.attn_dropout
        )  # (Q_u, d)
        cur = self.gru(self.resid_dropout(self.cross_out(msg)), cur)  # (Q_u, d)

        q, k, v = self.self_qkv(self.norm_self(cur)).chunk(3, dim=-1)  # 3 x (Q_u, d)
        attended = _multi_head_attention(q, k, v, self.num_heads, None, self.attn_dropout)  # (Q_u, d)
        cur = cur + self.resid_dropout(self.self_out(attended))  # (Q_u, d)
        return cur + self.resid_dropout(self.ffn(self.norm_ffn(cur)))  # (Q_u, d)


def _check_frame(features: Tensor, geometry: Tensor, d_model: int, features_name: str, geometry_name: str) -> None:
    if features.dim() != 2 or features.shape[1] != d_model:
        raise ValueError(f"{features_name} must have shape (Q, {d_model}), got {tuple(features.shape)}")
    if geometry.shape != (features.shape[0], 6):
        raise ValueError(
            f"{geometry_name} must have shape ({features.shape[0]}, 6) boxes (cx, cy, cz, dx, dy, dz), "
            f"got {tuple(geometry.shape)}"
        )


class TimeDividedTransformer(nn.Module):
    """Cross-frame query transformer predicting frame-to-frame matches (see the module docstring).

    Args:
        d_model: d, the query feature width.
        num_heads: H, attention heads; must divide ``d_model``.
        num_layers: number of (cross-attention, GRU, self-attention, FFN) layers.
        ffn_dim: hidden width of each FFN.
        geometry_dim: width of the per-query box encoding, ``6 + 3 F`` with F >= 1 sine octaves
            of the centre (9: ``[centre, sin(centre), size]``).
        dropout: dropout on attention weights, residual branches and the FFN.
        geometry_hidden: hidden width of the pairwise geometry MLPs.
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        num_heads: int = 8,
        num_layers: int = 2,
        ffn_dim: int = 512,
        geometry_dim: int = 9,
        dropout: float = 0.0,
        geometry_hidden: int = 64,
    ) -> None:
        super().__init__()
        if d_model <= 0 or num_heads <= 0 or d_model % num_heads != 0:
            raise ValueError(
                f"d_model must be a positive multiple of num_heads, got d_model={d_model}, num_heads={num_heads}"
            )
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if geometry_dim < 9 or (geometry_dim - 6) % 3 != 0:
            raise ValueError(f"geometry_dim must be 6 + 3F with F >= 1 (9, 12, 15, ...), got {geometry_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.num_frequencies = (geometry_dim - 6) // 3
        self.layers = nn.ModuleList(
            _TDTLayer(d_model, num_heads, ffn_dim, geometry_dim, geometry_hidden, dropout) for _ in range(num_layers)
        )
        self.norm_match_prev = nn.LayerNorm(d_model)
        self.norm_match_cur = nn.LayerNorm(d_model)
        self.match_prev = nn.Linear(d_model, d_model)
        self.match_cur = nn.Linear(d_model, d_model)
        self.match_geometry = _PairwiseGeometryMLP(geometry_dim, geometry_hidden, 1)

    def forward(
        self, prev_features: Tensor, prev_geometry: Tensor, cur_features: Tensor, cur_geometry: Tensor
    ) -> TDTOutput:
        """Update the current frame's queries from the previous frame and score all pairs.

        Args:
            prev_features: ``(Q_t, d)`` previous-frame (or memory) query features.
            prev_geometry: ``(Q_t, 6)`` their boxes ``(cx, cy, cz, dx, dy, dz)``.
            cur_features: ``(Q_u, d)`` current-frame query features.
            cur_geometry: ``(Q_u, 6)`` their boxes.

        Returns:
            :class:`TDTOutput` with ``features (Q_u, d)`` and ``match_logits (Q_t, Q_u)``.
        """
        _check_frame(prev_features, prev_geometry, self.d_model, "prev_features", "prev_geometry")
        _check_frame(cur_features, cur_geometry, self.d_model, "cur_features", "cur_geometry")
        prev_enc = box_geometry_encoding(prev_geometry, self.num_frequencies)  # (Q_t, g)
        cur_enc = box_geometry_encoding(cur_geometry, self.num_frequencies)  # (Q_u, g)
        prev_centre, cur_centre = prev_geometry[:, :3], cur_geometry[:, :3]  # (Q_t, 3), (Q_u, 3)

        cur = cur_features
        for layer in self.layers:
            cur = layer(cur, cur_enc, cur_centre, prev_features, prev_enc, prev_centre)  # (Q_u, d)

        p = self.match_prev(self.norm_match_prev(prev_features))  # (Q_t, d)
        c = self.match_cur(self.norm_match_cur(cur))  # (Q_u, d)
        geometry_term = self.match_geometry(prev_enc, prev_centre, cur_enc, cur_centre)  # (Q_t, Q_u, 1)
        match_logits = p @ c.T / math.sqrt(self.d_model) + geometry_term.squeeze(-1)  # (Q_t, Q_u)
        return TDTOutput(features=cur, match_logits=match_logits)

    def forward_sequence(self, features: list[Tensor], geometry: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run the transformer along a sequence of V frames.

        Frame 0's features pass through unchanged; frame t+1 attends to frame t's *updated*
        features, so information flows along the whole sequence.

        Args:
            features: V tensors ``(Q_t, d)``.
            geometry: V tensors ``(Q_t, 6)``.

        Returns:
            ``(updated, match_logits)``: V tensors ``(Q_t, d)`` and V - 1 tensors
            ``(Q_t, Q_{t+1})``.
        """
        if len(features) != len(geometry) or len(features) == 0:
            raise ValueError(
                f"features and geometry must be non-empty lists of equal length V, "
                f"got {len(features)} and {len(geometry)}"
            )
        for t, (feat, geom) in enumerate(zip(features, geometry)):
            _check_frame(feat, geom, self.d_model, f"features[{t}]", f"geometry[{t}]")
        updated = [features[0]]
        match_logits: list[Tensor] = []
        for t in range(len(features) - 1):
            out = self(updated[t], geometry[t], features[t + 1], geometry[t + 1])
            updated.append(out.features)
            match_logits.append(out.match_logits)
        return updated, match_logits
